// Streaming chat completions (SSE). http_req_waiting is the time to the first byte, which for
// the simulator is the first chunk: the time to first token as the client sees it.
// env: BASE_URL (…/v1), API_KEY, MODEL, VUS, DURATION, STOP (optional: a stop sequence)
import http from "k6/http";
import { check } from "k6";

export const options = {
  vus: Number(__ENV.VUS || 1),
  duration: __ENV.DURATION || "10s",
};

const url = `${__ENV.BASE_URL}/chat/completions`;
const params = {
  headers: { "Content-Type": "application/json", Authorization: `Bearer ${__ENV.API_KEY}` },
};
const body = JSON.stringify({
  model: __ENV.MODEL,
  messages: [{ role: "user", content: "Stream a short answer about toll gates and meters." }],
  max_tokens: 16,
  stream: true,
  ...(__ENV.STOP ? { stop: [__ENV.STOP] } : {}),
});

export default function () {
  const res = http.post(url, body, params);
  check(res, {
    "status 200": (r) => r.status === 200,
    "ends with [DONE]": (r) => typeof r.body === "string" && r.body.includes("data: [DONE]"),
  });
}
