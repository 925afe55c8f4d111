// mesh-chat (TypeScript): chat with the mesh gateway through Connect-ES.
//
//   tsx src/cli.ts --addr http://127.0.0.1:50051 --api-key KEY "Why is the sky blue?"
//   tsx src/cli.ts --transport grpc-web --addr http://127.0.0.1:8080 --api-key KEY "Hello"
//   tsx src/cli.ts --addr ... --resume TURN_ID --after-seq 12
//   tsx src/cli.ts --addr https://127.0.0.1:50051 --ca .state/certs/ca.pem --api-key KEY "Hello"
//
// --json prints one JSON object per frame (the same shape as the Go client's).
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  cancelTurn,
  connectGateway,
  followTurn,
  resumeTurn,
  type TransportKind,
  type TurnEvent,
} from "./gateway.js";

const usage = `usage: mesh-chat [options] MESSAGE...
  --addr URL           gateway (grpc) or Envoy (grpc-web) base URL [http://127.0.0.1:50051]
  --transport KIND     grpc | grpc-web [grpc]
  --api-key KEY        API key [$MESH_API_KEY]
  --ca FILE            PEM CA bundle for an https:// address [$MESH_GATEWAY_CA]
  --conversation ID    conversation to continue
  --max-tokens N       most tokens to generate
  --resume TURN_ID     resume a turn instead of starting one
  --after-seq N        with --resume: last sequence number already received [0]
  --stop-after N       drop the stream after N tokens (then resume it with --resume)
  --cancel-after N     cancel the turn (CancelTurn) after N tokens
  --timeout-s S        give up after S seconds [300]
  --json               one JSON object per frame`;

function fail(message: string): never {
  process.stderr.write(`mesh-chat: ${message}\n${usage}\n`);
  process.exit(2);
}

function intOption(value: string | undefined, name: string, fallback: number): number {
  if (value === undefined) return fallback;
  const parsed = Number(value);
  if (!Number.isInteger(parsed) || parsed < 0) fail(`--${name} must be a non-negative integer`);
  return parsed;
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    addr: { type: "string", default: "http://127.0.0.1:50051" },
    transport: { type: "string", default: "grpc" },
    "api-key": { type: "string", default: process.env.MESH_API_KEY ?? "" },
    ca: { type: "string", default: process.env.MESH_GATEWAY_CA ?? "" },
    conversation: { type: "string" },
    "max-tokens": { type: "string" },
    resume: { type: "string" },
    "after-seq": { type: "string" },
    "stop-after": { type: "string" },
    "cancel-after": { type: "string" },
    "timeout-s": { type: "string" },
    json: { type: "boolean", default: false },
    help: { type: "boolean", default: false },
  },
});

if (values.help) {
  process.stdout.write(`${usage}\n`);
  process.exit(0);
}
const transport = values.transport as TransportKind;
if (transport !== "grpc" && transport !== "grpc-web") fail("--transport is grpc or grpc-web");
if (!values["api-key"]) fail("an API key is needed: --api-key or $MESH_API_KEY");
const text = positionals.join(" ").trim();
if (!values.resume && !text) fail("give the message to send, or --resume TURN_ID");
if (values.resume && text) fail("--resume takes no message");
const stopAfter = intOption(values["stop-after"], "stop-after", 0);
const cancelAfter = intOption(values["cancel-after"], "cancel-after", 0);
const timeoutS = intOption(values["timeout-s"], "timeout-s", 300);

const addr = values.addr.includes("://") ? values.addr : `http://${values.addr}`;
let ca: string | undefined;
if (values.ca) {
  if (!addr.startsWith("https://")) fail("--ca needs an https:// address");
  try {
    ca = readFileSync(values.ca, "utf8");
  } catch (error) {
    fail(`cannot read the CA file ${values.ca}: ${(error as Error).message}`);
  }
}
const client = connectGateway({ baseUrl: addr, transport, apiKey: values["api-key"], ca });
const abort = new AbortController();
const timer = setTimeout(() => abort.abort(new Error(`timed out after ${timeoutS}s`)), timeoutS * 1000);

function emit(kind: string, fields: Record<string, unknown>, human: string): void {
  if (values.json) {
    process.stdout.write(`${JSON.stringify({ event: kind, ...fields })}\n`);
  } else if (kind === "token") {
    process.stdout.write(human);
  } else {
    process.stderr.write(`${human}\n`);
  }
}

function show(event: TurnEvent): void {
  switch (event.kind) {
    case "accepted":
      emit(
        "accepted",
        { turn_id: event.turnId, conversation_id: event.conversationId, queue_position: event.queuePosition },
        `[turn ${event.turnId} in conversation ${event.conversationId}, queue position ${event.queuePosition}]`,
      );
      break;
    case "token":
      emit("token", { turn_id: event.turnId, seq: event.seq, text: event.text }, event.text);
      break;
    case "finished":
      emit(
        "finished",
        {
          turn_id: event.turnId,
          finish_reason: event.finishReason,
          last_seq: event.lastSeq,
          completion_tokens: event.completionTokens,
        },
        `\n[finished: ${event.finishReason}, last seq ${event.lastSeq}]`,
      );
      break;
  }
}

async function main(): Promise<number> {
  const events = values.resume
    ? resumeTurn(client, values.resume, intOption(values["after-seq"], "after-seq", 0), abort.signal)
    : followTurn(client, text, {
        conversationId: values.conversation,
        maxTokens: intOption(values["max-tokens"], "max-tokens", 0),
        signal: abort.signal,
        onResume: (turnId, afterSeq, error) =>
          emit("resumed", { turn_id: turnId, after_seq: afterSeq, error: error.message },
            `\n[stream dropped (${error.message}); resuming ${turnId} after seq ${afterSeq}]`),
      });
  let tokens = 0;
  let turnId = values.resume ?? "";
  for await (const event of events) {
    show(event);
    if (event.kind === "accepted") turnId = event.turnId;
    if (event.kind === "finished") return 0;
    if (event.kind !== "token") continue;
    tokens += 1;
    if (cancelAfter > 0 && tokens === cancelAfter) {
      await cancelTurn(client, turnId);
      emit("cancel_sent", { turn_id: turnId, after_tokens: tokens }, `\n[cancel sent for ${turnId}]`);
    }
    if (stopAfter > 0 && tokens >= stopAfter) {
      emit("dropped", { turn_id: turnId, last_seq: event.seq },
        `\n[dropped after seq ${event.seq}: resume with --resume ${turnId} --after-seq ${event.seq}]`);
      // Leaving the loop ends the call: the client drops the stream mid-turn on purpose.
      return 0;
    }
  }
  process.stderr.write("mesh-chat: the stream ended before the turn finished\n");
  return 1;
}

function exit(code: number): void {
  clearTimeout(timer);
  process.exitCode = code;
  // A pooled HTTP/2 session can outlive the last call; don't let it keep a finished CLI alive.
  setTimeout(() => process.exit(code), 200).unref();
}

main()
  .then(exit)
  .catch((error: unknown) => {
    const message = error instanceof ConnectError ? `${Code[error.code]}: ${error.rawMessage}` : String(error);
    emit("error", { message }, `mesh-chat: ${message}`);
    exit(1);
  });
