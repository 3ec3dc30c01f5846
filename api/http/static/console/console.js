// The console's one script: a form shows it is working and cannot be sent twice by a double
// click (the server is idempotent anyway: each form carries its own id), and a dangerous
// button can ask first. Everything works without it.
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  var button = event.submitter || form.querySelector("button[type=submit]");
  if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) {
    event.preventDefault();
    return;
  }
  if (form.method.toLowerCase() !== "post") { return; }
  if (form.dataset.sent === "1") { event.preventDefault(); return; }
  form.dataset.sent = "1";
  form.setAttribute("aria-busy", "true");
  if (button) {
    if (button.dataset.busy) { button.textContent = button.dataset.busy; }
    button.setAttribute("aria-disabled", "true");
    button.classList.add("busy");
  }
});
document.addEventListener("click", function (event) {
  var link = event.target.closest("a[data-busy]");
  if (link) { link.textContent = link.dataset.busy; link.classList.add("busy"); link.setAttribute("aria-busy", "true"); }
});
