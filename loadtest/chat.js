// Non-streaming chat completions at a fixed number of VUs.
// env: BASE_URL (…/v1), API_KEY, MODEL, VUS, DURATION
import http from "k6/http";
import { check } from "k6";

export const options = {
  vus: Number(__ENV.VUS || 1),
  duration: __ENV.DURATION || "10s",
  discardResponseBodies: false,
};

const url = `${__ENV.BASE_URL}/chat/completions`;
const params = {
  headers: { "Content-Type": "application/json", Authorization: `Bearer ${__ENV.API_KEY}` },
};
const body = JSON.stringify({
  model: __ENV.MODEL,
  messages: [
    { role: "system", content: "You are a terse assistant that answers in one short sentence." },
    { role: "user", content: "Explain in one sentence what an inference gateway does for a team " +
      "that runs its own model servers, and why it meters every request it forwards." },
  ],
  max_tokens: 16,
  temperature: 0.2,
});

export default function () {
  const res = http.post(url, body, params);
  check(res, { "status 200": (r) => r.status === 200 });
}
