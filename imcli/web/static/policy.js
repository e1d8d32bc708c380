// The page's Trusted Types policy, loaded before every other script. Its Content-Security-Policy says
// `require-trusted-types-for 'script'; trusted-types default`: Chromium then refuses every string that
// would become HTML or script (innerHTML, outerHTML, insertAdjacentHTML, document.write, a <script>'s
// text or src, eval, new Function, a Worker's URL) unless this policy passes it. It passes one thing:
// the URL of a blob this page made (mqtt.js's keep-alive timer runs in a Worker built from one). No
// HTML, no script text: whatever someone sends can only ever reach the page as text.
"use strict";
if (window.trustedTypes && window.trustedTypes.createPolicy) {
  window.trustedTypes.createPolicy("default", {
    createScriptURL: (url) => (typeof url === "string" && url.startsWith(`blob:${location.origin}/`) ? url : null),
  });
}
