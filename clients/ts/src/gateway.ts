// A small client for the mesh gateway: start a turn and follow its tokens, resuming after a
// dropped connection from the last sequence number seen, over native gRPC (HTTP/2) or over
// gRPC-web through Envoy (fetch, the same transport a browser uses).
import { randomUUID } from "node:crypto";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import {
  createGrpcTransport,
  createGrpcWebTransport as createNodeGrpcWebTransport,
} from "@connectrpc/connect-node";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { FinishReason } from "../../../gen/ts/chat/common/v1/common_pb.js";
import type {
  ResumeTurnResponse,
  StreamTurnResponse,
} from "../../../gen/ts/chat/gateway/v1/gateway_pb.js";
import { GatewayService } from "../../../gen/ts/chat/gateway/v1/gateway_service_pb.js";

export type TransportKind = "grpc" | "grpc-web";
export type GatewayClient = Client<typeof GatewayService>;

export type TurnEvent =
  | { kind: "accepted"; turnId: string; conversationId: string; queuePosition: number }
  | { kind: "token"; turnId: string; seq: number; text: string }
  | { kind: "finished"; turnId: string; finishReason: string; lastSeq: number; completionTokens: number };

export interface ConnectOptions {
  /** `http://host:port` of a gateway (grpc) or of Envoy (grpc-web); `https://` for TLS. */
  baseUrl: string;
  transport: TransportKind;
  apiKey: string;
  /** PEM CA bundle to trust for an `https://` base URL (default: the system's CAs). */
  ca?: string;
}

/** A gateway client whose every call carries the API key. */
export function connectGateway(options: ConnectOptions): GatewayClient {
  const withKey: Interceptor = (next) => async (request) => {
    request.header.set("x-api-key", options.apiKey);
    return next(request);
  };
  const interceptors = [withKey];
  const { baseUrl, ca } = options;
  if (options.transport === "grpc") {
    const nodeOptions = ca ? { ca } : undefined;
    return createClient(GatewayService, createGrpcTransport({ baseUrl, interceptors, nodeOptions }));
  }
  // fetch (what a browser uses) cannot be given a CA; with one, Node's own HTTP/1.1 client
  // speaks the same gRPC-web.
  const transport = ca
    ? createNodeGrpcWebTransport({ baseUrl, interceptors, httpVersion: "1.1", nodeOptions: { ca } })
    : createGrpcWebTransport({ baseUrl, interceptors });
  return createClient(GatewayService, transport);
}

function toEvent(response: StreamTurnResponse | ResumeTurnResponse): TurnEvent | undefined {
  const frame = response.frame;
  switch (frame.case) {
    case "accepted":
      return {
        kind: "accepted",
        turnId: frame.value.turnId,
        conversationId: frame.value.conversationId,
        queuePosition: frame.value.queuePosition,
      };
    case "token":
      return {
        kind: "token",
        turnId: frame.value.turnId,
        seq: Number(frame.value.seq),
        text: frame.value.text,
      };
    case "finished":
      return {
        kind: "finished",
        turnId: frame.value.turnId,
        // Same spelling as the proto (and the Go client): FINISH_REASON_STOP, not STOP.
        finishReason: `FINISH_REASON_${FinishReason[frame.value.finishReason] ?? frame.value.finishReason}`,
        lastSeq: Number(frame.value.lastSeq),
        completionTokens: frame.value.usage?.completionTokens ?? 0,
      };
    default:
      return undefined;
  }
}

export interface StartOptions {
  conversationId?: string;
  maxTokens?: number;
  requestId?: string;
  signal?: AbortSignal;
}

/** Start a turn with StreamTurn and yield its frames as they arrive. */
export async function* streamTurn(
  client: GatewayClient,
  text: string,
  options: StartOptions = {},
): AsyncGenerator<TurnEvent> {
  const request = {
    start: {
      text,
      conversationId: options.conversationId ?? "",
      requestId: options.requestId ?? randomUUID(),
      options: options.maxTokens ? { maxTokens: options.maxTokens } : undefined,
    },
  };
  for await (const response of client.streamTurn(request, { signal: options.signal })) {
    const event = toEvent(response);
    if (event) yield event;
  }
}

/** Re-attach to a turn with ResumeTurn: every token after `afterSeq`, live until it ends. */
export async function* resumeTurn(
  client: GatewayClient,
  turnId: string,
  afterSeq: number,
  signal?: AbortSignal,
): AsyncGenerator<TurnEvent> {
  for await (const response of client.resumeTurn(
    { turnId, afterSeq: BigInt(afterSeq) },
    { signal },
  )) {
    const event = toEvent(response);
    if (event) yield event;
  }
}

// Errors a reconnect can cure; anything else (bad key, unknown turn) is final.
const RETRYABLE = new Set([Code.Unavailable, Code.Internal, Code.Unknown, Code.DeadlineExceeded]);

export interface FollowOptions extends StartOptions {
  /** Reconnect attempts after a dropped stream (each one resumes after the last seq seen). */
  maxResumes?: number;
  /** Called before each retry, with the turn (empty if not yet accepted) and the last seq. */
  onResume?: (turnId: string, afterSeq: number, error: ConnectError) => void;
}

/**
 * Start a turn and follow it to the end, surviving dropped connections: each token is yielded
 * exactly once, in order, because a resume asks only for what comes after the last seq seen
 * and anything at or below it is skipped.
 */
export async function* followTurn(
  client: GatewayClient,
  text: string,
  options: FollowOptions = {},
): AsyncGenerator<TurnEvent> {
  let turnId = "";
  let lastSeq = 0;
  let resumes = 0;
  // One request id for every attempt: a start retried before its acceptance arrived gets the
  // same turn back instead of a second one.
  const started = { ...options, requestId: options.requestId ?? randomUUID() };
  let source: AsyncGenerator<TurnEvent> = streamTurn(client, text, started);
  for (;;) {
    try {
      for await (const event of source) {
        if (event.kind === "accepted") turnId = event.turnId;
        if (event.kind === "token") {
          if (event.seq <= lastSeq) continue;
          lastSeq = event.seq;
        }
        yield event;
        if (event.kind === "finished") return;
      }
      throw new ConnectError("stream ended before the turn finished", Code.Unavailable);
    } catch (caught) {
      const error = ConnectError.from(caught);
      if (!RETRYABLE.has(error.code) || resumes >= (options.maxResumes ?? 5)) {
        throw error;
      }
      resumes += 1;
      options.onResume?.(turnId, lastSeq, error);
      await new Promise((resolve) => setTimeout(resolve, Math.min(2000, 100 * 2 ** resumes)));
      source = turnId
        ? resumeTurn(client, turnId, lastSeq, options.signal)
        : streamTurn(client, text, started);
    }
  }
}

/** Stop a queued or generating turn; its stream then ends with FINISH_REASON_CANCELLED. */
export async function cancelTurn(client: GatewayClient, turnId: string): Promise<void> {
  await client.cancelTurn({ turnId });
}
