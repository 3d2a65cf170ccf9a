// Klaus gallery: probability bars, and "classify a new photo" without a page reload.
// Results are built with textContent only: nothing from the server becomes HTML.
"use strict";

function bars(root) {
  for (const bar of root.querySelectorAll(".bar[data-p]")) {
    const p = Math.max(0, Math.min(1, parseFloat(bar.dataset.p) || 0));
    bar.style.width = (p * 5).toFixed(2) + "rem";
  }
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function showResult(out, data) {
  out.replaceChildren();
  if (data.error) {
    out.append(el("p", data.error, "error"));
    return;
  }
  out.append(el("p", "Top 5 in " + data.elapsed_ms + " ms" + (data.width ? " (" + data.width + " × " + data.height + ")" : ""), "muted"));
  const list = el("ol");
  for (const p of data.predictions) {
    const item = el("li");
    item.className = "prediction";
    item.append(el("strong", p.label), document.createTextNode(" " + (p.probability * 100).toFixed(1) + "% "));
    const bar = el("span", "", "bar");
    bar.dataset.p = String(p.probability);
    item.append(bar, el("div", p.hierarchy.join(" / "), "hier"));
    list.append(item);
  }
  out.append(list);
  bars(out);
}

async function classify(input) {
  const file = input.files && input.files[0];
  const out = document.getElementById("result");
  const preview = document.getElementById("preview");
  if (!file || !out) return;
  if (preview) {
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  }
  out.replaceChildren(el("p", "Classifying " + file.name + "…", "muted"));
  const body = new FormData();
  body.append("photo", file);
  try {
    const response = await fetch("/api/classify", { method: "POST", body });
    let data;
    try { data = await response.json(); } catch (e) { data = { error: "HTTP " + response.status }; }
    if (!response.ok && !data.error) data.error = "HTTP " + response.status;
    showResult(out, data);
  } catch (e) {
    showResult(out, { error: "cannot reach the Klaus server (" + e + ")" });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  bars(document);
  const input = document.getElementById("photo");
  const form = document.getElementById("classify-form");
  if (input) input.addEventListener("change", () => classify(input));
  if (form) form.addEventListener("submit", (event) => { event.preventDefault(); classify(input); });
});
