// Keyboard shortcuts on the sample view: m, f, u press the matching decision button.
"use strict";
document.addEventListener("keydown", (event) => {
  const target = event.target;
  if (target instanceof HTMLElement && target.closest("textarea, input, select")) {
    if (event.key === "Escape") target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const button = document.querySelector(`#decision button[data-key="${event.key}"]`);
  if (button) {
    event.preventDefault();
    button.click();
  }
});
