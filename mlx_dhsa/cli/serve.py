"""``mlx-dhsa serve``: mlx-lm's OpenAI-compatible server, serving a DHSA-patched model.

The HTTP handling, request parsing, streaming and the in-memory prompt cache reused between
turns are mlx-lm's (``mlx_lm.server``). This module changes what mlx-lm leaves open:

* the model comes from :func:`mlx_dhsa.load` (patched with DHSA, float32 on a CPU) and is the
  only one served: a request naming another model, an adapter or a draft model is refused
  (mlx-lm would download and load it);
* requests are served one at a time on the DHSA prompt cache (mlx-lm's batch generator makes
  caches of its own);
* a prompt longer than the model's context is a 400 error, and generation stops at the context;
* each response says which attention ran: the ``X-DHSA-Attention`` header (non-streaming) and
  ``usage.attention`` (non-streaming, and streaming's final chunk and usage chunk);
* long prompts are kept on disk (:mod:`mlx_dhsa.cli.doc_cache`) and reloaded when repeated,
  also after a restart;
* it binds to 127.0.0.1 and sends no CORS header unless told to.
"""

import argparse
import gc
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import mlx.core as mx
import typer
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START
from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.server import (
    APIHandler,
    GenerationContext,
    ModelProvider,
    Response,
    ResponseGenerator,
    get_system_fingerprint,
)

from ..config import DHSAConfig
from ..evaluation.runinfo import PrefillPaths, attention_path
from ..loading import resolve
from . import distributed as dist
from . import ui
from .chat import model_context
from .doc_cache import DEFAULT_MAX_GB, CorruptEntry, DocCache, namespace
from .options import (
    AllowedOrigin,
    Dense,
    DocCacheGB,
    DocCacheOn,
    Host,
    LogLevel,
    MaxTokens,
    Model,
    Pipeline,
    Port,
    Temp,
    dhsa_options,
)

DEFAULT_PORT = 8080
DEFAULT_MAX_TOKENS = 512  # as mlx_lm.server
DEFAULT_DISK_MIN_TOKENS = 1024  # prompts that prefill at least this many new tokens go to disk
log = logging.getLogger("mlx_dhsa.serve")


class RequestRejected(ValueError):
    """A request the server will not serve as asked; the message says why (HTTP 400)."""


class ModelNotServed(LookupError):
    """The request names a model this server does not serve (HTTP 404)."""


def server_args(model: str, **overrides) -> argparse.Namespace:
    """The ``cli_args`` mlx-lm's server classes read, with mlx-lm's defaults."""
    args = dict(
        model=model,
        adapter_path=None,
        draft_model=None,
        num_draft_tokens=3,
        trust_remote_code=False,
        chat_template="",
        use_default_chat_template=False,
        chat_template_args={},
        temp=0.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        max_tokens=DEFAULT_MAX_TOKENS,
        allowed_origins=[],
        decode_concurrency=1,
        prompt_concurrency=1,
        prefill_step_size=2048,
        prompt_cache_size=10,
        prompt_cache_bytes=None,
        kv_bits=None,
        kv_group_size=64,
        quantized_kv_start=DEFAULT_QUANTIZED_KV_START,
        pipeline=False,
    )
    return argparse.Namespace(**{**args, **overrides})


class DHSAModelProvider(ModelProvider):
    """Loads one model through :func:`mlx_dhsa.load` and serves only that one.

    Args:
        cli_args (Namespace): from :func:`server_args`; ``cli_args.model`` is the name served.
        config (DHSAConfig): the DHSA settings.
        patch (bool): ``False`` serves mlx-lm's dense attention (to compare).
    """

    def __init__(self, cli_args: argparse.Namespace, config: DHSAConfig, *, patch: bool = True):
        super().__init__(cli_args)
        self.config, self.patch = config, patch
        self.name = cli_args.model
        self.path = resolve(self.name)
        self.context = model_context(self.name)
        self.namespace: str | None = None
        self.load_error: Exception | None = None
        self.loaded = threading.Event()

    def names(self) -> set[str]:
        """Model names a request may use for the served model."""
        return {"default_model", self.name, str(self.path), str(Path(self.path).resolve())}

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        self.reset()
        gc.collect()
        mx.clear_cache()
        try:
            model, tokenizer = dist.load(self.name, self.config, patch=self.patch)
            if mx.default_device() == mx.cpu:
                model.set_dtype(mx.float32)  # MLX's CPU half-precision matmuls are slow
            mx.eval(model.parameters())
            self.namespace = namespace(
                self.path, model, self.config if self.patch else None, tokenizer
            )
        except Exception as e:  # reported by start(); mlx-lm would log a traceback
            self.load_error = e
            self.loaded.set()
            return
        self.model_key = (model_path, None, None)
        self.model, self.tokenizer = model, tokenizer
        self.processor, self.draft_model = None, None
        self.is_batchable = False  # the batch generator would make its own (dense) caches
        self.loaded.set()

    def load_default(self):
        if self.model is None:
            self._load("default_model")

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        if model_path not in self.names():
            raise ModelNotServed(
                f"model {model_path!r} is not served here; this server serves {self.name!r}"
            )
        if adapter_path is not None:
            raise RequestRejected("adapters are not supported by mlx-dhsa serve")
        if draft_model_path not in (None, "default_model"):
            raise RequestRejected("draft models are not supported by mlx-dhsa serve")
        if self.model is None:
            self._load("default_model")
        if self.model is None:
            raise RuntimeError(f"the model failed to load: {self.load_error}")
        return self.model, self.tokenizer


class DiskPromptCache(LRUPromptCache):
    """mlx-lm's in-memory prompt cache, backed by a :class:`DocCache` for long prompts.

    A request whose prompt shares more tokens with a stored entry than with any in-memory one
    starts from the stored entry; a request that prefilled at least ``min_tokens`` new tokens
    is stored after it finishes. Lookups and inserts come from the one generation thread.
    """

    def __init__(self, provider: DHSAModelProvider, store: DocCache | None, min_tokens: int):
        super().__init__(provider.cli_args.prompt_cache_size)
        self.provider, self.store, self.min_tokens = provider, store, min_tokens
        self.last: dict[str, Any] = {}  # what the latest fetch did, for the response

    def fetch_nearest_cache(self, model, tokens):
        cache, rest = super().fetch_nearest_cache(model, tokens)
        have = len(tokens) - len(rest)
        self.last = {"disk": "off" if self.store is None else "miss", "fresh": len(rest)}
        if self.store is None or len(rest) < self.min_tokens:
            return cache, rest
        try:
            hit = self.store.nearest(self.provider.namespace, tokens, at_least=have + 1)
        except CorruptEntry as e:
            log.warning(str(e))
            hit = None
        if hit is None:
            return cache, rest
        n = len(hit.entry.tokens)
        self.last = {"disk": "hit", "fresh": len(tokens) - n, "load_s": hit.load_s}
        log.info(f"prompt cache: {n} tokens loaded from disk in {hit.load_s:.2f} s")
        return hit.cache, tokens[n:]

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type="assistant"):
        super().insert_cache(model, tokens, prompt_cache, cache_type=cache_type)
        if self.store is None or self.last.get("fresh", 0) < self.min_tokens:
            return
        saved = self.store.save(
            self.provider.namespace,
            tokens,
            prompt_cache,
            prefill_s=self.last.get("prefill_s", 0.0),
            prefill_path=self.last.get("prefill", "dense"),
        )
        self.last["disk"] = "saved" if saved is not None else "too large for the cap"


class _Tap:
    """Stands in for a request's response queue inside mlx-lm's generation thread: records
    the attention path of the prefill steps and of the last decode step onto the request's
    GenerationContext (as ``ctx.dhsa``) before passing every item on."""

    def __init__(self, queue, model, prompt_cache: DiskPromptCache):
        self.queue, self.model, self.prompt_cache = queue, model, prompt_cache
        self.paths, self.info, self.tic = PrefillPaths(model), {}, time.perf_counter()

    def put(self, item):
        if isinstance(item, GenerationContext):
            item.dhsa = self.info
        elif isinstance(item, tuple):
            self.paths(*item)
        elif isinstance(item, Response) and "prefill" not in self.info:
            self.info["prefill"] = self.paths.path
            self.prompt_cache.last["prefill"] = self.paths.path
            self.prompt_cache.last["prefill_s"] = time.perf_counter() - self.tic
        elif item is None:
            self.info["decode"] = attention_path(self.model)
            self.info["disk_cache"] = self.prompt_cache.last.get("disk", "off")
        self.queue.put(item)


STOP = "mlx-dhsa serve: stop"  # shared by rank 0 in place of a request: the followers stop


class DHSAResponseGenerator(ResponseGenerator):
    """mlx-lm's generator, one request at a time, with the context check and path records.

    Under ``mlx.launch`` rank 0 also ends the followers' loops when it stops: mlx-lm stops
    only its own, and the followers would wait for the next request forever."""

    def stop_and_join(self):
        if self._is_distributed and self._rank == 0 and self.generation_available():
            self.requests.put((None, STOP, None))  # shared with the followers, then stops
            self._generation_thread.join()
        else:
            super().stop_and_join()

    def _next_request(self, timeout=None):
        request = super()._next_request(timeout)
        if request is not None and isinstance(request[1], str) and request[1] == STOP:
            self._stop = True
            return None
        return request

    def _run_generate(self):
        try:
            super()._run_generate()
        finally:
            # MLX keeps this thread's streams in C++ thread-locals whose destructors take the
            # GIL; run late, while the main thread finalizes, they abort the process
            # ("terminate called without an active exception", issue 22). Free them here.
            mx.clear_streams()

    def _tokenize(self, tokenizer, request, args):
        out = super()._tokenize(tokenizer, request, args)
        context, n = self.model_provider.context, len(out[0])
        if context is not None:
            if n >= context:
                raise RequestRejected(
                    f"the prompt is {n:,} tokens but the model's context is {context:,} tokens: "
                    "shorten the messages"
                )
            args.max_tokens = min(args.max_tokens, context - n)
        return out

    def _serve_single(self, request, stream):
        rqueue, body, args = request
        tap = _Tap(rqueue, self.model_provider.model, self.prompt_cache)
        super()._serve_single((tap, body, args), stream)


class _Recording:
    """The shared response generator, seen by one request handler: keeps the request's
    context (with its attention record) and the error that refused it."""

    def __init__(self, generator: ResponseGenerator, handler: "DHSAHandler"):
        self._generator, self._handler = generator, handler

    def generate(self, *args, **kwargs):
        try:
            ctx, response = self._generator.generate(*args, **kwargs)
        except Exception as e:
            self._handler.failure = e
            raise
        self._handler.ctx = ctx
        return ctx, response

    def __getattr__(self, name):
        return getattr(self._generator, name)


class _OpenAIErrors:
    """The handler's output stream: mlx-lm's ``{"error": "text"}`` bodies become OpenAI's
    ``{"error": {"message": ..., "type": ..., "code": ...}}``, which clients display."""

    def __init__(self, wfile, handler: "DHSAHandler"):
        self._wfile, self._handler = wfile, handler

    def write(self, data: bytes):
        status = self._handler.status
        if status >= 400 and data.startswith(b"{"):
            try:
                body = json.loads(data)
            except ValueError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                kind = "not_found_error" if status == 404 else "invalid_request_error"
                error = {"message": body["error"], "type": kind, "code": status}
                data = json.dumps({"error": error}).encode()
        return self._wfile.write(data)

    def __getattr__(self, name):
        return getattr(self._wfile, name)


class DHSAHandler(APIHandler):
    """mlx-lm's request handler plus the attention report, 400 for refused requests, errors in
    OpenAI's shape and a model list that names only the served model."""

    def __init__(self, response_generator, *args, **kwargs):
        self.ctx, self.failure, self.status = None, None, 0
        super().__init__(_Recording(response_generator, self), *args, **kwargs)

    def setup(self):
        super().setup()
        self.wfile = _OpenAIErrors(self.wfile, self)

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def _record(self) -> dict:
        return getattr(self.ctx, "dhsa", {}) if self.ctx is not None else {}

    def _attention(self) -> dict:
        info = self._record()
        return {
            "prefill": info.get("prefill", "dense"),
            "decode": info.get("decode", "dense"),
            "disk_cache": info.get("disk_cache", "off"),
        }

    def _set_completion_headers(self, status_code: int = 200):
        if status_code == 404 and isinstance(self.failure, RequestRejected):
            status_code = 400
        super()._set_completion_headers(status_code)
        provider = self.response_generator.model_provider
        self.send_header("X-DHSA-Method", provider.config.method if provider.patch else "dense")

    def _set_stream_headers(self, status_code: int = 200):
        super()._set_stream_headers(status_code)
        provider = self.response_generator.model_provider
        self.send_header("X-DHSA-Method", provider.config.method if provider.patch else "dense")

    def end_headers(self):
        info = self._record()
        if "decode" in info:  # known only once generation is over (non-streaming replies)
            a = self._attention()
            self.send_header("X-DHSA-Attention", f"prefill={a['prefill']}; decode={a['decode']}")
            self.send_header("X-DHSA-Disk-Cache", a["disk_cache"])
        super().end_headers()

    def generate_response(self, text, finish_reason, *args, **kwargs) -> dict:
        response = super().generate_response(text, finish_reason, *args, **kwargs)
        if finish_reason is not None:
            if "usage" in response:
                response["usage"]["attention"] = self._attention()
            else:  # the final streamed chunk
                response["attention"] = self._attention()
        return response

    def completion_usage_response(self, *args, **kwargs):
        response = super().completion_usage_response(*args, **kwargs)
        response["usage"]["attention"] = self._attention()
        return response

    def handle_models_request(self):
        provider = self.response_generator.model_provider
        body = {
            "object": "list",
            "data": [{"id": provider.name, "object": "model", "created": self.created}],
        }
        self._set_completion_headers(200)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())
        self.wfile.flush()

    def log_message(self, format, *args):  # route http.server's access log through logging
        log.info("%s - %s", self.address_string(), format % args)


@dataclass
class Server:
    """A running server: ``url``, and ``close()`` to stop it."""

    httpd: ThreadingHTTPServer
    generator: DHSAResponseGenerator
    provider: DHSAModelProvider
    thread: threading.Thread

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.generator.stop_and_join()
        self.thread.join(timeout=10)


def start(
    model: str,
    config: DHSAConfig,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    patch: bool = True,
    store: DocCache | None = None,
    disk_min_tokens: int = DEFAULT_DISK_MIN_TOKENS,
    load_timeout: float | None = None,
    **cli_overrides,
) -> Server:
    """Load ``model`` and serve it on ``host:port`` (``port=0``: any free port) in a thread.

    Raises:
        ModelNotFoundError: unknown model.
        Exception: whatever loading the model raised (the server is stopped first).
        OSError: the address cannot be bound.
    """
    provider = DHSAModelProvider(server_args(model, **cli_overrides), config, patch=patch)
    httpd = ThreadingHTTPServer((host, port), lambda *a, **k: None)  # bind before loading
    generator = DHSAResponseGenerator(provider, DiskPromptCache(provider, store, disk_min_tokens))
    try:  # on any failure, Ctrl-C included, leave no thread behind
        provider.loaded.wait(load_timeout)
        if provider.load_error is not None or provider.model is None:
            raise provider.load_error or TimeoutError(f"{model} did not load in {load_timeout} s")
        fingerprint = get_system_fingerprint()
        httpd.RequestHandlerClass = lambda *a, **k: DHSAHandler(
            generator, *a, system_fingerprint=fingerprint, **k
        )
        thread = threading.Thread(target=httpd.serve_forever, name="mlx-dhsa-serve", daemon=True)
        thread.start()
    except BaseException:
        httpd.server_close()
        generator.stop_and_join()
        raise
    return Server(httpd, generator, provider, thread)


def follow(model: str, config: DHSAConfig, *, dense: bool, **cli_overrides) -> None:
    """A follower rank of ``serve`` under ``mlx.launch``: runs every request rank 0 shares,
    until rank 0 stops. Ctrl-C reaches every rank on a terminal; it is rank 0's to act on.

    Raises:
        typer.Exit: the generation loop failed (e.g. rank 0 went away without stopping).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    provider = DHSAModelProvider(server_args(model, **cli_overrides), config, patch=not dense)
    generator = DHSAResponseGenerator(provider, DiskPromptCache(provider, None, 0))
    generator.join()
    if generator._generation_failed:
        ui.fail("serve: this rank lost rank 0 before it stopped (see the log above)")


DEFAULT_MODEL = "gemma-3-270m"


@dhsa_options
def serve(
    model: Model = DEFAULT_MODEL,
    host: Host = "127.0.0.1",
    port: Port = DEFAULT_PORT,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    temp: Temp = 0.0,
    dense: Dense = False,
    doc_cache: DocCacheOn = True,
    doc_cache_gb: DocCacheGB = DEFAULT_MAX_GB,
    allowed_origin: AllowedOrigin = None,
    log_level: LogLevel = "INFO",
    pipeline: Pipeline = False,
    config: DHSAConfig = None,
):
    """OpenAI-compatible server (mlx-lm's) for a DHSA model: /v1/chat/completions, /v1/completions,
    /v1/models; long prompts stay prefilled on disk."""
    level = log_level if dist.leader() else "WARNING"  # followers: only what went wrong
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    dist.start(pipeline)  # under mlx.launch rank 0 answers HTTP; mlx-lm shares each request
    store = DocCache(max_gb=doc_cache_gb) if doc_cache and not dist.launched() else None
    if not dist.leader():
        follow(model, config, max_tokens=max_tokens, temp=temp, dense=dense, pipeline=pipeline)
        return
    try:
        with ui.status(f"Loading {model}"):
            server = start(
                model,
                config,
                host=host,
                port=port,
                patch=not dense,
                store=store,
                max_tokens=max_tokens,
                temp=temp,
                allowed_origins=allowed_origin or [],
                pipeline=pipeline,
            )
    except KeyboardInterrupt:
        ui.note("stopped")
        raise typer.Exit(130) from None
    except OSError as e:
        ui.fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    except Exception as e:
        ui.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    try:  # from here on, Ctrl-C (even during the banner) stops the server
        attention = "dense" if dense else f"DHSA {config.method}"
        ui.line(f"mlx-dhsa serve: {model} ({attention}) at {server.url}")
        if dist.launched():
            ui.note(dist.describe())
        ui.note(
            f"Try: curl {server.url}/chat/completions -H 'Content-Type: application/json' "
            """-d '{"messages": [{"role": "user", "content": "Hello"}]}'"""
        )
        if store is not None:
            ui.note(f"Long prompts are kept in {store.root} (--no-doc-cache to turn off).")
        ui.note("Ctrl-C stops the server.")
        while server.thread.is_alive():
            server.thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    ui.note("stopped")
