// The chat page: talks gRPC-web to the gateway through Envoy on the page's own origin.
//
// A turn is started with StreamTurn and its tokens are appended as they arrive. The turn id,
// the last seq shown and the text so far live in sessionStorage, so after a reload or a dropped
// connection the page asks ResumeTurn for exactly what comes after that seq: nothing is shown
// twice and nothing is lost.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { FinishReason } from "../../gen/ts/chat/common/v1/common_pb.js";
import { Role, type Conversation } from "../../gen/ts/chat/common/v1/conversation_pb.js";
import type {
  ResumeTurnResponse,
  StreamTurnResponse,
} from "../../gen/ts/chat/gateway/v1/gateway_pb.js";
import { GatewayService } from "../../gen/ts/chat/gateway/v1/gateway_service_pb.js";

const STORE_KEY = "mesh.apiKey";
const STORE_ACTIVE = "mesh.activeTurn";
const STORE_CONVERSATION = "mesh.conversationId";
// Reconnects after a dropped stream before giving up (each resumes after the last seq).
const MAX_RESUMES = 8;
const RETRYABLE = new Set([Code.Unavailable, Code.Unknown, Code.Internal, Code.DeadlineExceeded]);

/** The turn on screen, persisted after every frame. */
interface ActiveTurn {
  turnId: string;
  conversationId: string;
  userText: string;
  text: string;
  lastSeq: number;
}

function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`page is missing #${id}`);
  return found as T;
}

const ui = {
  keyForm: element<HTMLFormElement>("key-form"),
  apiKey: element<HTMLInputElement>("api-key"),
  newChat: element<HTMLButtonElement>("new-chat"),
  conversations: element<HTMLUListElement>("conversations"),
  messages: element<HTMLOListElement>("messages"),
  status: element<HTMLParagraphElement>("status"),
  composer: element<HTMLFormElement>("composer"),
  prompt: element<HTMLTextAreaElement>("prompt"),
  send: element<HTMLButtonElement>("send"),
  cancel: element<HTMLButtonElement>("cancel"),
  maxTokens: element<HTMLInputElement>("max-tokens"),
};

const withKey: Interceptor = (next) => async (request) => {
  request.header.set("x-api-key", sessionStorage.getItem(STORE_KEY) ?? "");
  return next(request);
};
const apiBase = document.querySelector<HTMLMetaElement>('meta[name="mesh-api"]')?.content;
const client = createClient(
  GatewayService,
  createGrpcWebTransport({ baseUrl: apiBase || window.location.origin, interceptors: [withKey] }),
);

let active: ActiveTurn | null = null;
let conversationId = sessionStorage.getItem(STORE_CONVERSATION) ?? "";

function setStatus(state: string, text: string): void {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function describe(error: unknown): string {
  const connect = ConnectError.from(error);
  switch (connect.code) {
    case Code.Unauthenticated:
      return "The API key was refused. Check it and press “Use key”.";
    case Code.ResourceExhausted:
      return `The mesh is busy: ${connect.rawMessage}. Try again in a moment.`;
    case Code.PermissionDenied:
    case Code.NotFound:
    case Code.InvalidArgument:
      return connect.rawMessage;
    default:
      return `Connection problem (${Code[connect.code]}): ${connect.rawMessage}`;
  }
}

/** 128 random bits in hex; crypto.randomUUID needs a secure context, this does not. */
function newRequestId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function saveActive(): void {
  if (active) sessionStorage.setItem(STORE_ACTIVE, JSON.stringify(active));
  else sessionStorage.removeItem(STORE_ACTIVE);
}

function loadActive(): ActiveTurn | null {
  const raw = sessionStorage.getItem(STORE_ACTIVE);
  if (!raw) return null;
  try {
    const parsed = JSON.parse(raw) as ActiveTurn;
    return parsed.turnId ? parsed : null;
  } catch {
    return null;
  }
}

function setConversation(id: string): void {
  conversationId = id;
  if (id) sessionStorage.setItem(STORE_CONVERSATION, id);
  else sessionStorage.removeItem(STORE_CONVERSATION);
  for (const button of ui.conversations.querySelectorAll<HTMLButtonElement>("button")) {
    button.setAttribute("aria-current", String(button.dataset.conversationId === id));
  }
}

function addMessage(role: "user" | "assistant", text: string): HTMLLIElement {
  const item = document.createElement("li");
  item.className = `msg ${role}`;
  item.textContent = text;
  ui.messages.append(item);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return item;
}

function setBusy(busy: boolean): void {
  ui.send.disabled = busy;
  ui.newChat.disabled = busy;
  ui.cancel.disabled = !busy || !active?.turnId;
}

/** Apply one frame of StreamTurn/ResumeTurn; returns true when the turn has ended. */
function apply(response: StreamTurnResponse | ResumeTurnResponse, bubble: HTMLLIElement): boolean {
  if (!active) return true;
  const frame = response.frame;
  switch (frame.case) {
    case "accepted": {
      active.turnId = frame.value.turnId;
      active.conversationId = frame.value.conversationId;
      bubble.dataset.turnId = frame.value.turnId;
      if (conversationId !== frame.value.conversationId) setConversation(frame.value.conversationId);
      const position = frame.value.queuePosition;
      ui.status.dataset.queuePosition = String(position);
      if (position > 0) setStatus("queued", `Waiting in queue: position ${position}`);
      else setStatus("generating", "Generating…");
      ui.cancel.disabled = false;
      saveActive();
      return false;
    }
    case "token": {
      const seq = Number(frame.value.seq);
      // The gateway never repeats a seq on one stream; this guards the seam of a resume.
      if (seq <= active.lastSeq) return false;
      active.lastSeq = seq;
      active.text += frame.value.text;
      bubble.append(frame.value.text);
      bubble.dataset.lastSeq = String(seq);
      const state = ui.status.dataset.state;
      if (state !== "generating" && state !== "cancelling") setStatus("generating", "Generating…");
      saveActive();
      ui.messages.scrollTop = ui.messages.scrollHeight;
      return false;
    }
    case "finished": {
      const reason = `FINISH_REASON_${FinishReason[frame.value.finishReason] ?? frame.value.finishReason}`;
      bubble.dataset.finish = reason;
      bubble.normalize();
      const cancelled = frame.value.finishReason === FinishReason.CANCELLED;
      setStatus("finished", cancelled ? "Cancelled." : `Done (${Number(frame.value.lastSeq)} tokens).`);
      active = null;
      saveActive();
      return true;
    }
    default:
      return false;
  }
}

/** Follow the active turn to its end, resuming after the last seq whenever the stream drops. */
async function follow(
  first: AsyncIterable<StreamTurnResponse | ResumeTurnResponse>,
  bubble: HTMLLIElement,
  restart?: () => AsyncIterable<StreamTurnResponse>,
): Promise<void> {
  let stream = first;
  let resumes = 0;
  setBusy(true);
  try {
    for (;;) {
      try {
        for await (const response of stream) {
          resumes = 0;
          if (apply(response, bubble)) return;
        }
        throw new ConnectError("the stream ended before the turn finished", Code.Unavailable);
      } catch (error) {
        const connect = ConnectError.from(error);
        // Before the turn is accepted there is nothing to resume, but the start can be sent
        // again: its request id makes the gateway answer with the same turn, not a second one.
        const turn = active;
        const canRetry = turn !== null && (turn.turnId !== "" || restart !== undefined);
        if (!canRetry || !RETRYABLE.has(connect.code) || resumes >= MAX_RESUMES) {
          setStatus("error", describe(connect));
          if (!turn?.turnId) {
            active = null;
            saveActive();
          }
          return;
        }
        resumes += 1;
        setStatus("reconnecting", `Connection lost; resuming (attempt ${resumes})…`);
        await new Promise((resolve) => setTimeout(resolve, Math.min(4000, 250 * 2 ** resumes)));
        stream =
          turn.turnId || !restart
            ? client.resumeTurn({ turnId: turn.turnId, afterSeq: BigInt(turn.lastSeq) })
            : restart();
      }
    }
  } finally {
    setBusy(false);
    void refreshConversations();
  }
}

async function send(text: string): Promise<void> {
  if (active) return;
  if (!sessionStorage.getItem(STORE_KEY)) {
    setStatus("error", "Enter your API key first.");
    return;
  }
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  active = { turnId: "", conversationId, userText: text, text: "", lastSeq: 0 };
  setStatus("sending", "Sending…");
  const maxTokens = Number.parseInt(ui.maxTokens.value, 10);
  const options = Number.isInteger(maxTokens) && maxTokens > 0 ? { maxTokens } : undefined;
  const request = { start: { text, conversationId, options, requestId: newRequestId() } };
  await follow(client.streamTurn(request), bubble, () => client.streamTurn(request));
}

async function cancel(): Promise<void> {
  if (!active?.turnId) return;
  ui.cancel.disabled = true;
  setStatus("cancelling", "Cancelling…");
  try {
    await client.cancelTurn({ turnId: active.turnId });
  } catch (error) {
    setStatus("error", describe(error));
    ui.cancel.disabled = false;
  }
}

function renderConversation(conversation: Conversation): void {
  ui.messages.replaceChildren();
  for (const message of conversation.messages) {
    const item = addMessage(message.role === Role.USER ? "user" : "assistant", message.text);
    item.dataset.turnId = message.turnId;
    if (message.role === Role.ASSISTANT) {
      item.dataset.finish = `FINISH_REASON_${FinishReason[message.finishReason] ?? message.finishReason}`;
    }
  }
}

async function openConversation(id: string): Promise<void> {
  if (active) return;
  try {
    const response = await client.getConversation({ conversationId: id });
    setConversation(id);
    if (response.conversation) renderConversation(response.conversation);
    setStatus("idle", "");
  } catch (error) {
    setStatus("error", describe(error));
  }
}

async function refreshConversations(): Promise<void> {
  if (!sessionStorage.getItem(STORE_KEY)) return;
  try {
    const response = await client.listConversations({ pageSize: 50 });
    const items = response.conversations.map((conversation) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.conversationId = conversation.conversationId;
      button.textContent = conversation.title || conversation.conversationId;
      button.title = conversation.title;
      button.setAttribute("aria-current", String(conversation.conversationId === conversationId));
      button.addEventListener("click", () => void openConversation(conversation.conversationId));
      item.append(button);
      return item;
    });
    ui.conversations.replaceChildren(...items);
  } catch (error) {
    // The list is a convenience; a failure here must not hide a turn's own status.
    if (!active) setStatus("error", describe(error));
  }
}

function start(): void {
  ui.apiKey.value = sessionStorage.getItem(STORE_KEY) ?? "";
  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(STORE_KEY, ui.apiKey.value.trim());
    setStatus("idle", "Key saved for this tab.");
    void refreshConversations();
  });
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.prompt.value.trim();
    if (!text || active) return;
    ui.prompt.value = "";
    void send(text);
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.cancel.addEventListener("click", () => void cancel());
  ui.newChat.addEventListener("click", () => {
    if (active) return;
    setConversation("");
    ui.messages.replaceChildren();
    setStatus("idle", "");
  });

  const resumed = loadActive();
  if (resumed) {
    // A reload mid-turn: show what was already received, then ask for the rest.
    active = resumed;
    setConversation(resumed.conversationId);
    addMessage("user", resumed.userText);
    const bubble = addMessage("assistant", resumed.text);
    bubble.dataset.turnId = resumed.turnId;
    bubble.dataset.lastSeq = String(resumed.lastSeq);
    bubble.dataset.resumedAfter = String(resumed.lastSeq);
    setStatus("reconnecting", "Resuming…");
    void follow(
      client.resumeTurn({ turnId: resumed.turnId, afterSeq: BigInt(resumed.lastSeq) }),
      bubble,
    );
  } else if (conversationId && sessionStorage.getItem(STORE_KEY)) {
    void openConversation(conversationId);
  } else if (!sessionStorage.getItem(STORE_KEY)) {
    setStatus("idle", "Enter your API key to start.");
  }
  void refreshConversations();
}

start();
