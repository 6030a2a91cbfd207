// The ranking page: build a ranking of K outputs by keyboard or mouse, time the decision,
// and show request feedback.
//
// Loaded as a file with the page's CSP nonce; it never evaluates strings and adds no inline
// handlers. Everything it writes into the page is its own text (set with textContent) or
// elements it creates; the outputs' untrusted text is never read or copied.
(function () {
  "use strict";

  var root = document.getElementById("rank-root");
  if (!root) return;

  // Positions (1..K, as shown), best first.
  var ranking = [];

  function cardForm() {
    return root.querySelector("form.ranker");
  }

  function size(form) {
    return Number(form.dataset.k) || 0;
  }

  var status = window.rlhfCards.status;

  // -- decision time: from the moment the task is shown, only while the tab is visible -----

  var timer = null;

  function startTimer() {
    timer = { elapsed: 0, since: document.hidden ? null : performance.now() };
  }

  function elapsedMs() {
    if (!timer) return null;
    var total = timer.elapsed;
    if (timer.since !== null) total += performance.now() - timer.since;
    return Math.max(0, Math.round(total));
  }

  document.addEventListener("visibilitychange", function () {
    if (!timer) return;
    if (document.hidden) {
      if (timer.since !== null) {
        timer.elapsed += performance.now() - timer.since;
        timer.since = null;
      }
    } else if (timer.since === null) {
      timer.since = performance.now();
    }
  });

  // -- the ranking -------------------------------------------------------------------------

  function button(label, title, data) {
    var b = document.createElement("button");
    b.type = "button";
    b.className = "button-quiet";
    b.textContent = label;
    b.title = title;
    b.setAttribute("aria-label", title);
    Object.keys(data).forEach(function (key) {
      b.dataset[key] = data[key];
    });
    return b;
  }

  function render(form) {
    var k = size(form);
    var input = form.querySelector("[data-order]");
    if (input) input.value = ranking.join(",");
    var list = form.querySelector("[data-ranking]");
    if (list) {
      list.replaceChildren();
      ranking.forEach(function (position, index) {
        var item = document.createElement("li");
        item.className = "rank-item";
        item.dataset.position = String(position);
        var number = document.createElement("span");
        number.className = "rank-item-number";
        number.textContent = "#" + (index + 1);
        item.appendChild(number);
        var label = document.createElement("span");
        label.className = "rank-item-label";
        label.textContent = "Output " + position;
        item.appendChild(label);
        item.appendChild(button("\u2191", "Move output " + position + " up", { move: String(index), by: "-1" }));
        item.appendChild(button("\u2193", "Move output " + position + " down", { move: String(index), by: "1" }));
        item.appendChild(button("\u00d7", "Take output " + position + " out", { remove: String(index) }));
        list.appendChild(item);
      });
    }
    var hint = form.querySelector("[data-ranking-empty]");
    if (hint) hint.hidden = ranking.length > 0;
    form.querySelectorAll("[data-output]").forEach(function (node) {
      var position = Number(node.dataset.position);
      var rank = ranking.indexOf(position);
      var badge = node.querySelector("[data-badge]");
      if (badge) badge.textContent = rank >= 0 ? "#" + (rank + 1) : "";
      node.classList.toggle("is-ranked", rank >= 0);
      var pick = node.querySelector("[data-pick]");
      if (pick) pick.disabled = rank >= 0;
    });
    var submitButton = form.querySelector("[data-submit]");
    if (submitButton) submitButton.setAttribute("aria-disabled", ranking.length === k ? "false" : "true");
  }

  function pick(form, position) {
    var k = size(form);
    if (!(position >= 1 && position <= k) || ranking.indexOf(position) >= 0) return false;
    ranking.push(position);
    if (ranking.length === k - 1) {
      // One output left: it can only be last.
      for (var n = 1; n <= k; n++) {
        if (ranking.indexOf(n) < 0) ranking.push(n);
      }
    }
    status("");
    render(form);
    return true;
  }

  function undo(form) {
    if (ranking.length === 0) return false;
    ranking.pop();
    render(form);
    return true;
  }

  function reset(form) {
    ranking = [];
    status("");
    render(form);
  }

  function move(form, index, by) {
    var to = index + by;
    if (index < 0 || index >= ranking.length || to < 0 || to >= ranking.length) return;
    var held = ranking[index];
    ranking[index] = ranking[to];
    ranking[to] = held;
    render(form);
  }

  function initCard() {
    ranking = [];
    var form = cardForm();
    if (!form) {
      timer = null;
      return;
    }
    startTimer();
    render(form);
  }

  var submit = window.rlhfCards.submit;

  root.addEventListener("click", function (event) {
    var target = event.target.closest ? event.target.closest("button") : null;
    if (!target) return;
    if (target.hasAttribute("data-help-open")) {
      toggleHelp();
      return;
    }
    var form = cardForm();
    if (!form || !form.contains(target)) return;
    if (target.dataset.pick) {
      pick(form, Number(target.dataset.pick));
    } else if (target.dataset.move) {
      move(form, Number(target.dataset.move), Number(target.dataset.by));
    } else if (target.dataset.remove) {
      ranking.splice(Number(target.dataset.remove), 1);
      render(form);
    } else if (target.hasAttribute("data-reset")) {
      reset(form);
    }
  });

  // Capture phase: runs before htmx reads the form. An incomplete ranking is stopped here
  // (the server refuses it too); a complete one goes with its decision time.
  document.addEventListener(
    "submit",
    function (event) {
      var form = event.target;
      if (!form.matches || !form.matches("form.ranker")) return;
      var k = size(form);
      if (ranking.length !== k) {
        event.preventDefault();
        event.stopPropagation();
        status("Rank every output first: " + ranking.length + " of " + k + " ranked.");
        return;
      }
      var field = form.querySelector('input[name="decision_ms"]');
      var ms = elapsedMs();
      if (field) field.value = ms === null ? "" : String(ms);
      var order = form.querySelector("[data-order]");
      if (order) order.value = ranking.join(",");
    },
    true
  );

  // -- help --------------------------------------------------------------------------------

  var help = document.getElementById("help");

  function toggleHelp() {
    if (!help) return;
    if (help.open) {
      help.close();
    } else if (typeof help.showModal === "function") {
      help.showModal();
    } else {
      help.setAttribute("open", "");
    }
  }

  // -- keyboard ----------------------------------------------------------------------------

  function isTyping(target) {
    return Boolean(
      target &&
        target.closest &&
        target.closest('textarea, select, [contenteditable], input:not([type="radio"]):not([type="checkbox"]):not([type="hidden"])')
    );
  }

  document.addEventListener("keydown", function (event) {
    if (event.defaultPrevented || event.isComposing || event.altKey) return;
    if (help && help.open) {
      if (event.key === "?") {
        event.preventDefault();
        toggleHelp();
      }
      return; // the dialog handles Escape itself
    }
    if (isTyping(event.target) || event.ctrlKey || event.metaKey) return;
    if (event.key === "?") {
      event.preventDefault();
      toggleHelp();
      return;
    }
    var form = cardForm();
    if (!form) return;
    if (event.key === "Enter") {
      // Let buttons, links and the guidelines toggle keep their own Enter.
      if (event.target.closest && event.target.closest("button, a, summary")) return;
      event.preventDefault();
      submit(form);
      return;
    }
    if (event.key === "Backspace") {
      if (undo(form)) event.preventDefault();
      return;
    }
    if ((event.key || "").toLowerCase() === "r" && !event.shiftKey) {
      event.preventDefault();
      reset(form);
      return;
    }
    var digit = /^(?:Digit|Numpad)([1-9])$/.exec(event.code || "") || /^([1-9])$/.exec(event.key || "");
    if (digit && !event.shiftKey && pick(form, Number(digit[1]))) event.preventDefault();
  });

  // -- htmx feedback -----------------------------------------------------------------------

  root.addEventListener("htmx:beforeRequest", function (event) {
    var form = cardForm();
    if (form && event.detail.elt && form.contains(event.detail.elt)) form.dataset.sending = "1";
  });

  root.addEventListener("htmx:afterRequest", function () {
    var form = cardForm();
    if (form) delete form.dataset.sending;
  });

  window.rlhfCards.bindRequestFeedback(root, "ranking");

  root.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail.target && event.detail.target.id === "card") {
      status("");
      initCard();
    }
  });

  initCard();
  // Shortcuts are live from here on; browser tests wait for this.
  root.dataset.ready = "1";
})();
