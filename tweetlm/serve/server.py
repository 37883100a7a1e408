"""`tweetlm serve RUN`: the app under uvicorn, on 127.0.0.1 unless told otherwise.

Graceful shutdown: on SIGTERM or Ctrl-C uvicorn stops accepting connections, in-flight requests and
streams run to their end (at most `request_timeout`, then they are cancelled), and only then does the
app close the engine.
"""

import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from tweetlm.errors import UserError, check
from tweetlm.serve.app import ServeLimits, create_app
from tweetlm.serve.grounding import GroundingConfig


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    run: Path
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the line printed at start says which)
    model_name: str | None = None  # default: the run folder's name
    api_key: str | None = None
    device: str = "auto"
    max_batch_size: int = 32
    limits: ServeLimits = field(default_factory=ServeLimits)
    moderate: Path | None = None  # a `tweetlm safety train` folder: moderate requests and replies
    moderate_threshold: float | None = None  # default: the classifier's own
    index: Path | None = None  # a posts index (made if missing): /v1/posts, /v1/search, grounded chat
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    log_level: str = "info"

    def __post_init__(self):
        check(0 <= self.port < 65536, "port", self.port, "must be in 0..65535")
        check(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, "must be at least 1")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("the API key is empty: give a non-empty key or none")
        if self.grounding.default and self.index is None:
            raise UserError("--ground needs a posts index: add --index INDEX (made by `tweetlm index add`)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts so that port 0 and "address in use" are handled here."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets, and without it a response's
        # head and body wait ~40 ms for the client's delayed ACK (Nagle's algorithm)
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --host or --port") from None
    sock.listen(2048)
    return sock


def uvicorn_server(app, limits: ServeLimits, log_level: str = "info") -> uvicorn.Server:
    # graceful shutdown waits for the longest a request may run, plus a little for its last bytes
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=int(limits.request_timeout) + 5,
                            server_header=False)
    return uvicorn.Server(config)


def serve(cfg: ServeConfig) -> None:
    from tweetlm.device import resolve_device
    from tweetlm.infer.engine import Engine
    from tweetlm.model.weights import load_model
    from tweetlm.search.index import Index

    sock = bind(cfg.host, cfg.port)  # first: a taken port fails at once, not after loading the model
    index = None
    try:
        index = Index(cfg.index) if cfg.index is not None else None
        moderator = None
        if cfg.moderate is not None:
            from tweetlm.artifacts.safety import SafetyClassifier  # scikit-learn, only to moderate

            moderator = SafetyClassifier.load(cfg.moderate, cfg.moderate_threshold)
        device = resolve_device(cfg.device)
        model, tokenizer = load_model(cfg.run, device=device)
    except BaseException:
        sock.close()
        if index is not None:
            index.close()
        raise
    name = cfg.model_name or Path(cfg.run).resolve().name
    engine = Engine(model, tokenizer, max_batch_size=cfg.max_batch_size)
    app = create_app(engine, tokenizer, model_name=name, api_key=cfg.api_key, limits=cfg.limits, moderator=moderator,
                     index=index, grounding=cfg.grounding)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"serving {name} ({device}, context {engine.max_seq_len} tokens) at {url}: web chat at {url}/, "
          f"OpenAI API at {url}/v1{', API key required' if cfg.api_key else ''}"
          f"{f', moderated at threshold {moderator.threshold:.3f}' if moderator else ''}", flush=True)
    if index is not None:
        print(f"posts index {cfg.index} ({index.count:,} posts): {url}/v1/posts, {url}/v1/search; chat answers "
              f"grounded {'by default' if cfg.grounding.default else 'on request'} "
              f"({cfg.grounding.k} posts, at most {cfg.grounding.tokens} tokens)", flush=True)
    # uvicorn re-raises the signal it stopped on once it has shut down gracefully: SIGTERM then ends
    # the process like Ctrl-C, with exit code 0, instead of killing it by the default action
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn_server(app, cfg.limits, cfg.log_level).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.close()  # already closed by the app at shutdown; this covers a failed startup
        if index is not None:
            index.close()
    print("server stopped", flush=True)
