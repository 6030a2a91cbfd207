// The rater's keyboard, decision timer and request feedback.
//
// Loaded as a file with the page's CSP nonce; it never evaluates strings and adds no inline
// handlers. It reads the page (and the JSON in #rate-config) and never writes untrusted text
// into the DOM as HTML: messages it shows are its own, set with textContent.
(function () {
  "use strict";

  var root = document.getElementById("rate-root");
  if (!root) return;

  var config = {};
  var configNode = document.getElementById("rate-config");
  if (configNode) {
    try {
      config = JSON.parse(configNode.textContent) || {};
    } catch (err) {
      config = {};
    }
  }
  var strengthScale = Number(config.strengthScale) || 0;

  var KEY_TO_CHOICE = {
    "1": "left", a: "left",
    "2": "right", b: "right",
    "3": "tie", t: "tie",
    "4": "both_bad", x: "both_bad",
  };

  function cardForm() {
    return root.querySelector("form.judge");
  }

  var status = window.rlhfCards.status;

  // -- decision time -----------------------------------------------------------------------
  // Counted from the moment both responses have been on screen, and only while the tab is
  // visible: a rater who switches tabs for lunch does not record a one-hour decision.

  var timer = null;
  var observer = null;

  function resetTimer() {
    timer = { started: false, elapsed: 0, since: null };
  }

  function startTimer() {
    if (!timer || timer.started) return;
    timer.started = true;
    timer.since = document.hidden ? null : performance.now();
  }

  function elapsedMs() {
    if (!timer || !timer.started) return null;
    var total = timer.elapsed;
    if (timer.since !== null) total += performance.now() - timer.since;
    return Math.max(0, Math.round(total));
  }

  document.addEventListener("visibilitychange", function () {
    if (!timer || !timer.started) return;
    if (document.hidden) {
      if (timer.since !== null) {
        timer.elapsed += performance.now() - timer.since;
        timer.since = null;
      }
    } else if (timer.since === null) {
      timer.since = performance.now();
    }
  });

  function watchOutputs(form) {
    if (observer) {
      observer.disconnect();
      observer = null;
    }
    var outputs = form.querySelectorAll("[data-output]");
    if (!("IntersectionObserver" in window) || outputs.length === 0) {
      startTimer();
      return;
    }
    var seen = new Set();
    observer = new IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        if (entry.isIntersecting) seen.add(entry.target);
      });
      if (seen.size === outputs.length) {
        startTimer();
        observer.disconnect();
        observer = null;
      }
    });
    outputs.forEach(function (node) {
      observer.observe(node);
    });
  }

  // -- the card ----------------------------------------------------------------------------

  function selectedChoice(form) {
    var checked = form.querySelector('input[name="choice"]:checked');
    return checked ? checked.value : "";
  }

  function syncStrength(form) {
    var fieldset = form.querySelector("[data-strength]");
    if (!fieldset) return;
    var choice = selectedChoice(form);
    // "How much better" only means something when one side wins; a disabled fieldset is
    // also left out of the submitted form.
    fieldset.disabled = choice === "tie" || choice === "both_bad";
  }

  function initCard() {
    resetTimer();
    var form = cardForm();
    if (!form) return;
    watchOutputs(form);
    syncStrength(form);
  }

  function choose(form, value) {
    var input = form.querySelector('input[name="choice"][value="' + value + '"]');
    if (!input) return false;
    input.checked = true;
    input.focus({ preventScroll: true });
    syncStrength(form);
    return true;
  }

  function chooseStrength(form, n) {
    if (n < 1 || n > strengthScale) return false;
    var fieldset = form.querySelector("[data-strength]");
    if (!fieldset || fieldset.disabled) return false;
    var input = fieldset.querySelector('input[name="strength"][value="' + n + '"]');
    if (!input) return false;
    input.checked = true;
    return true;
  }

  var submit = window.rlhfCards.submit;

  root.addEventListener("change", function (event) {
    var form = event.target.closest && event.target.closest("form.judge");
    if (form && event.target.name === "choice") syncStrength(form);
  });

  // Capture phase: runs before htmx reads the form, so the request carries the time.
  document.addEventListener(
    "submit",
    function (event) {
      var form = event.target;
      if (!form.matches || !form.matches("form.judge")) return;
      var field = form.querySelector('input[name="decision_ms"]');
      var ms = elapsedMs();
      if (field) field.value = ms === null ? "" : String(ms);
    },
    true
  );

  // -- help --------------------------------------------------------------------------------

  var help = document.getElementById("help");

  function helpOpen() {
    return help && help.open;
  }

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

  root.addEventListener("click", function (event) {
    if (event.target.closest && event.target.closest("[data-help-open]")) toggleHelp();
  });

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
    if (helpOpen()) {
      if (event.key === "?") {
        event.preventDefault();
        toggleHelp();
      }
      return; // the dialog handles Escape itself
    }
    var form = cardForm();
    if (isTyping(event.target)) {
      if (form && event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        submit(form);
      }
      return;
    }
    if (event.ctrlKey || event.metaKey) return;
    if (event.key === "?") {
      event.preventDefault();
      toggleHelp();
      return;
    }
    if (!form) return;
    if (event.key === "Enter") {
      // Let buttons, links and the guidelines toggle keep their own Enter.
      if (event.target.closest && event.target.closest("button, a, summary")) return;
      event.preventDefault();
      submit(form);
      return;
    }
    // Shift+digit is read from the physical key (event.code), because Shift+1 types "!" on
    // a US keyboard and something else on others.
    var digit = /^(?:Digit|Numpad)([1-9])$/.exec(event.code || "");
    if (event.shiftKey && digit) {
      if (chooseStrength(form, Number(digit[1]))) event.preventDefault();
      return;
    }
    var choice = KEY_TO_CHOICE[(event.key || "").toLowerCase()];
    if (choice && choose(form, choice)) event.preventDefault();
  });

  // -- htmx feedback -----------------------------------------------------------------------

  root.addEventListener("htmx:beforeRequest", function (event) {
    var form = cardForm();
    if (form && event.detail.elt && form.contains(event.detail.elt)) form.dataset.sending = "1";
    status("");
  });

  root.addEventListener("htmx:afterRequest", function () {
    var form = cardForm();
    if (form) delete form.dataset.sending;
  });

  window.rlhfCards.bindRequestFeedback(root, "answer");

  root.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail.target && event.detail.target.id === "card") {
      initCard();
    }
    if (event.detail.target && event.detail.target.id === "card-errors") {
      var line = event.detail.target.querySelector("[data-field]");
      var field = line ? line.getAttribute("data-field") : "";
      var form = cardForm();
      var target = form && field ? form.querySelector('[name="' + CSS.escape(field) + '"]') : null;
      if (target && typeof target.focus === "function") target.focus();
    }
  });

  initCard();
  // Shortcuts are live from here on; browser tests (and anyone scripting the page) wait for this.
  root.dataset.ready = "1";
})();
