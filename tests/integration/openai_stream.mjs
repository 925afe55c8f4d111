// One streamed chat completion with the official `openai` npm package; prints a JSON report.
// OPENAI_BASE_URL, OPENAI_API_KEY and MODEL come from the test.
import OpenAI from "openai";

const client = new OpenAI({ maxRetries: 0 });
const stream = await client.chat.completions.create({
  model: process.env.MODEL,
  messages: [{ role: "user", content: "hello from node" }],
  max_tokens: 6,
  stream: true,
});
let text = "";
let chunks = 0;
let finishReason = null;
for await (const chunk of stream) {
  chunks += 1;
  const choice = chunk.choices[0];
  if (choice) {
    text += choice.delta.content ?? "";
    finishReason = choice.finish_reason ?? finishReason;
  }
}
console.log(JSON.stringify({ chunks, text, finish_reason: finishReason }));
