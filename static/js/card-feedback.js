// What the rating and ranking pages share: the status line under the guidelines, submitting
// the card, and how htmx requests of the card report back (4xx messages swapped in, errors
// worded for raters).
//
// Loaded as a file with the page's CSP nonce before rate.js / rank.js; it writes only its own
// messages, with textContent.
(function () {
  "use strict";

  function status(message, kind) {
    var box = document.getElementById("rate-status");
    if (!box) return;
    box.textContent = message || "";
    box.className = "rate-status" + (message ? " notice " + (kind || "error") : "");
  }

  // Submits the card's form through htmx (once per request: a second press while it is on
  // its way does nothing).
  function submit(form) {
    if (form.dataset.sending === "1") return;
    // A card swapped in a moment ago may not be wired up by htmx yet (it finishes after the
    // settle delay); submitting it then would be a plain form post and reload the page.
    if (window.htmx) window.htmx.process(form);
    if (typeof form.requestSubmit === "function") {
      form.requestSubmit();
    } else {
      form.dispatchEvent(new Event("submit", { cancelable: true, bubbles: true }));
    }
  }

  // ``what`` names the thing being submitted in the error messages ("answer", "ranking").
  function bindRequestFeedback(root, what) {
    // 409 (lease lost, campaign paused) and 422 (invalid input) carry a message meant for the
    // rater; htmx does not swap 4xx responses unless told to. Scoped to this page only.
    root.addEventListener("htmx:beforeSwap", function (event) {
      var code = event.detail.xhr.status;
      if (code === 409 || code === 422) {
        event.detail.shouldSwap = true;
        event.detail.isError = false;
      }
    });

    root.addEventListener("htmx:responseError", function (event) {
      var code = event.detail.xhr.status;
      if (code === 403) {
        status("Not allowed, or your session changed. Reload the page to continue.");
      } else if (code === 404) {
        status("This campaign is not available to you any more.");
      } else if (code === 429) {
        status("Too many requests. Wait a moment and try again.");
      } else {
        status("The server had a problem (" + code + "). Your " + what + " may not be saved: try again.");
      }
    });

    root.addEventListener("htmx:sendError", function () {
      status("Cannot reach the server. Check your connection and submit again.");
    });
  }

  window.rlhfCards = { status: status, submit: submit, bindRequestFeedback: bindRequestFeedback };
})();
