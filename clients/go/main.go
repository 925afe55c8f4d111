// Command mesh-chat chats with the llm-mesh gateway over native gRPC (the bidirectional Chat
// stream): it starts a turn, prints tokens as they arrive, and can resume a turn after a given
// sequence number, on any gateway.
//
//	mesh-chat -addr 127.0.0.1:50051 -api-key "$MESH_API_KEY" "Why is the sky blue?"
//	mesh-chat -addr 127.0.0.1:50051 -resume t2.10.40.0123456789abcdef -after-seq 12
//	mesh-chat -addr chat.example.com:443 -tls "Hello"            # TLS, the system's CAs
//	mesh-chat -addr 127.0.0.1:50051 -ca .state/certs/ca.pem "Hello"  # TLS, this CA bundle
//
// With -json every frame is printed as one JSON object per line (for scripts and tests).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	commonv1 "github.com/llm-mesh/llm-mesh/gen/go/chat/common/v1"
	gatewayv1 "github.com/llm-mesh/llm-mesh/gen/go/chat/gateway/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

type options struct {
	addr           string
	apiKey         string
	conversationID string
	resume         string
	afterSeq       int64
	maxTokens      int
	stopAfter      int
	jsonOut        bool
	timeout        time.Duration
	useTLS         bool
	caFile         string
	serverName     string
}

func parseFlags(args []string) (options, string, error) {
	var o options
	fs := flag.NewFlagSet("mesh-chat", flag.ContinueOnError)
	fs.StringVar(&o.addr, "addr", envOr("MESH_GATEWAY_ADDR", "127.0.0.1:50051"), "gateway address (host:port)")
	fs.StringVar(&o.apiKey, "api-key", os.Getenv("MESH_API_KEY"), "API key (default $MESH_API_KEY)")
	fs.StringVar(&o.conversationID, "conversation", "", "conversation to continue (empty starts one)")
	fs.StringVar(&o.resume, "resume", "", "turn id to resume instead of starting a turn")
	fs.Int64Var(&o.afterSeq, "after-seq", 0, "with -resume: last sequence number already received")
	fs.IntVar(&o.maxTokens, "max-tokens", 0, "most tokens to generate (0: the agent's default)")
	fs.IntVar(&o.stopAfter, "stop-after", 0, "drop the connection after this many tokens (to try -resume)")
	fs.BoolVar(&o.jsonOut, "json", false, "print one JSON object per frame")
	fs.DurationVar(&o.timeout, "timeout", 5*time.Minute, "give up after this long")
	fs.BoolVar(&o.useTLS, "tls", os.Getenv("MESH_GATEWAY_TLS") == "1", "TLS to the gateway, trusting the system's CAs (default $MESH_GATEWAY_TLS=1)")
	fs.StringVar(&o.caFile, "ca", os.Getenv("MESH_GATEWAY_CA"), "TLS to the gateway, trusting this PEM CA bundle (default $MESH_GATEWAY_CA)")
	fs.StringVar(&o.serverName, "server-name", os.Getenv("MESH_GATEWAY_SERVER_NAME"), "name the gateway's certificate must carry, when not the address's host")
	if err := fs.Parse(args); err != nil {
		return o, "", err
	}
	text := strings.TrimSpace(strings.Join(fs.Args(), " "))
	switch {
	case o.apiKey == "":
		return o, "", errors.New("an API key is needed: -api-key or $MESH_API_KEY")
	case o.resume == "" && text == "":
		return o, "", errors.New("give the message to send as arguments, or -resume TURN_ID")
	case o.resume != "" && text != "":
		return o, "", errors.New("-resume takes no message")
	}
	return o, text, nil
}

// transportCredentials is plaintext unless -tls or -ca asks for TLS.
func transportCredentials(o options) (credentials.TransportCredentials, error) {
	if !o.useTLS && o.caFile == "" {
		return insecure.NewCredentials(), nil
	}
	config := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: o.serverName}
	if o.caFile != "" {
		pem, err := os.ReadFile(o.caFile)
		if err != nil {
			return nil, fmt.Errorf("cannot read the CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s holds no PEM certificate", o.caFile)
		}
		config.RootCAs = pool
	}
	return credentials.NewTLS(config), nil
}

func envOr(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

// printer writes frames either as plain text (tokens to stdout, the rest to stderr) or as JSON.
type printer struct {
	jsonOut bool
	out     io.Writer
	errOut  io.Writer
}

func (p printer) event(kind string, fields map[string]any, human string) {
	if p.jsonOut {
		fields["event"] = kind
		line, _ := json.Marshal(fields)
		fmt.Fprintln(p.out, string(line))
		return
	}
	if kind == "token" {
		fmt.Fprint(p.out, human)
		return
	}
	fmt.Fprintln(p.errOut, human)
}

// chat runs one turn (or one resume) on a Chat stream and returns the finish reason.
func chat(ctx context.Context, client gatewayv1.GatewayServiceClient, o options, text string, p printer) (string, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.Chat(metadata.AppendToOutgoingContext(ctx, "x-api-key", o.apiKey))
	if err != nil {
		return "", err
	}
	first := &gatewayv1.ChatRequest{}
	if o.resume != "" {
		first.Frame = &gatewayv1.ChatRequest_Resume{Resume: &gatewayv1.ResumeTurn{TurnId: o.resume, AfterSeq: o.afterSeq}}
	} else {
		start := &gatewayv1.StartTurn{ConversationId: o.conversationID, Text: text}
		if o.maxTokens > 0 {
			start.Options = &commonv1.GenerationOptions{MaxTokens: int32(o.maxTokens)}
		}
		first.Frame = &gatewayv1.ChatRequest_Start{Start: start}
	}
	// io.EOF here means the server already ended the call (a refused key, say): Recv says why.
	if err := stream.Send(first); err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	tokens := 0
	for {
		response, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return "", errors.New("the gateway closed the stream before the turn finished")
			}
			return "", err
		}
		switch frame := response.Frame.(type) {
		case *gatewayv1.ChatResponse_Accepted:
			a := frame.Accepted
			p.event("accepted", map[string]any{
				"turn_id": a.TurnId, "conversation_id": a.ConversationId, "queue_position": a.QueuePosition,
			}, fmt.Sprintf("[turn %s in conversation %s, queue position %d]", a.TurnId, a.ConversationId, a.QueuePosition))
		case *gatewayv1.ChatResponse_Token:
			t := frame.Token
			p.event("token", map[string]any{"turn_id": t.TurnId, "seq": t.Seq, "text": t.Text}, t.Text)
			tokens++
			// Each token consumed frees one slot of the gateway's window; granting them one by
			// one keeps the window constant whatever its initial size.
			credit := &gatewayv1.ChatRequest{Frame: &gatewayv1.ChatRequest_Credit{Credit: &gatewayv1.FlowCredit{Tokens: 1}}}
			// io.EOF means the server ended the stream; Recv then reports how.
			if err := stream.Send(credit); err != nil && !errors.Is(err, io.EOF) {
				return "", err
			}
			if o.stopAfter > 0 && tokens >= o.stopAfter {
				p.event("dropped", map[string]any{"turn_id": t.TurnId, "last_seq": t.Seq},
					fmt.Sprintf("\n[dropped after seq %d: resume with -resume %s -after-seq %d]", t.Seq, t.TurnId, t.Seq))
				return "DROPPED", nil
			}
		case *gatewayv1.ChatResponse_Finished:
			f := frame.Finished
			reason := f.FinishReason.String()
			p.event("finished", map[string]any{
				"turn_id": f.TurnId, "finish_reason": reason, "last_seq": f.LastSeq,
				"completion_tokens": f.GetUsage().GetCompletionTokens(),
			}, fmt.Sprintf("\n[finished: %s, last seq %d]", reason, f.LastSeq))
			_ = stream.CloseSend()
			return reason, nil
		case *gatewayv1.ChatResponse_Error:
			st := frame.Error.GetStatus()
			p.event("error", map[string]any{"turn_id": frame.Error.TurnId, "code": st.GetCode(), "message": st.GetMessage()},
				fmt.Sprintf("[error %d: %s]", st.GetCode(), st.GetMessage()))
			_ = stream.CloseSend()
			return "", fmt.Errorf("turn failed: %s", st.GetMessage())
		}
	}
}

func run(args []string, stdout, stderr io.Writer) int {
	o, text, err := parseFlags(args)
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(stderr, "mesh-chat:", err)
		}
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	creds, err := transportCredentials(o)
	if err != nil {
		fmt.Fprintln(stderr, "mesh-chat:", err)
		return 2
	}
	conn, err := grpc.NewClient(o.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		fmt.Fprintln(stderr, "mesh-chat:", err)
		return 1
	}
	defer conn.Close()
	p := printer{jsonOut: o.jsonOut, out: stdout, errOut: stderr}
	if _, err := chat(ctx, gatewayv1.NewGatewayServiceClient(conn), o, text, p); err != nil {
		fmt.Fprintln(stderr, "mesh-chat:", err)
		return 1
	}
	return 0
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
