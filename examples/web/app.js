// Calls the GYBC API from the page with a publishable key and the signed-in user's token, and
// shows what came back: the data, the quota left (X-RateLimit-*), or a readable error. Every
// answer, allowed or refused, is readable here because the API's Envoy answers CORS preflights
// and exposes these headers (docs/browsers.md).

const PATH = "/api/v1/llm/gateway/list-threads";

// The user's Firebase ID token. In your app, from the Firebase JS SDK after sign-in:
//   import { getAuth } from "firebase/auth";
//   return getAuth().currentUser.getIdToken();   // refreshed by the SDK before it expires
// Here it comes from the form, to try the page without a Firebase project.
async function idToken() {
  return document.getElementById("token").value.trim();
}

// What a refusal means for the user, by the API's `reason` (docs/contract.md).
const EXPLAIN = {
  missing_credentials: "Send the publishable key and the user's token.",
  user_token_required: "Sign in first: a publishable key works only with a signed-in user.",
  invalid_token: "Your sign-in has expired or is not valid: sign in again.",
  invalid_api_key: "This app's API key is wrong, revoked or expired.",
  origin_not_allowed: "This site may not use this API key: add its origin to the key's allowed origins.",
  tenant_mismatch: "This user belongs to another organization than this app's key.",
  secret_key_in_browser: "A secret key must never be used in a page: use a publishable key.",
};

// One call. Resolves to what the page learnt (the tests read it too); never rejects.
async function listThreads() {
  const api = document.getElementById("api").value.trim().replace(/\/+$/, "");
  const key = document.getElementById("key").value.trim();
  const result = { status: 0 };
  let response;
  try {
    response = await fetch(api + PATH, {
      method: "POST",
      headers: {
        "X-API-Key": key,
        "Authorization": "Bearer " + (await idToken()),
        "Content-Type": "application/json",
      },
      body: "{}",
    });
  } catch (e) {
    // The browser hides why (unreachable, or an answer without CORS headers for this origin).
    result.error = "The API could not be reached, or its answer was not meant for this site " +
      "(check the API URL and that the page is served over http or https).";
    return show(result);
  }
  result.status = response.status;
  for (const [field, header] of [
    ["limit", "X-RateLimit-Limit"],
    ["remaining", "X-RateLimit-Remaining"],
    ["reset", "X-RateLimit-Reset"],
    ["retryAfter", "Retry-After"],
    ["wwwAuthenticate", "WWW-Authenticate"],
  ]) {
    result[field] = response.headers.get(header);
  }
  const text = await response.text();
  try {
    result.body = JSON.parse(text);
  } catch (e) {
    result.body = text;
  }
  if (!response.ok) {
    const reason = (result.body && result.body.reason) || "";
    result.reason = reason;
    if (response.status === 429 || response.status === 503) {
      const wait = result.retryAfter ? ` in ${result.retryAfter} s` : " shortly";
      result.error = (response.status === 429 ? "Too many requests" : "The API is unavailable") +
        `: try again${wait}.`;
    } else {
      const message = EXPLAIN[reason] || (result.body && result.body.message) || "Refused.";
      result.error = `${message} (${response.status} ${reason || response.statusText})`;
    }
  }
  return show(result);
}

function show(result) {
  const quota = document.getElementById("quota");
  quota.textContent = "";
  if (result.remaining !== null && result.remaining !== undefined) {
    const reset = result.reset ? new Date(Number(result.reset) * 1000).toLocaleTimeString() : "?";
    quota.textContent = `Requests left: ${result.remaining} of ${result.limit} (resets at ${reset}).`;
  }
  document.getElementById("error").textContent = result.error || "";
  document.getElementById("result").textContent = result.status >= 200 && result.status < 300
    ? JSON.stringify(result.body, null, 2)
    : "";
  return result;
}

// The query string may fill the form (?api=...&key=...&token=...), to try the page quickly.
for (const [name, value] of new URLSearchParams(location.search)) {
  const input = document.getElementById(name);
  if (input) input.value = value;
}

document.getElementById("call").addEventListener("submit", (event) => {
  event.preventDefault();
  listThreads();
});
