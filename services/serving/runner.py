"""The model process of one deployment: `python -m services.serving.runner CONFIG.json`.

It is the only part of serving that imports torch (the services' own processes never do). It downloads
the job's adapter (or merged model) and, for an adapter, the base model from object storage, loads them,
runs the self-check, reports it, then serves generation to the serving service on a loopback port:

- stdout carries one JSON object per line for the parent: `{"event": "checked", "check": {...},
  "error": "..."}` once the self-check ran (an empty error means it passed), then
  `{"event": "listening", "port": N}`; or `{"event": "failed", "reason": ..., "error": ...}` when the model
  did not load. Everything else (logs) goes to stderr.
- `POST /generate` takes `{"messages", "max_tokens", "temperature", "top_p", "stop"}` and streams
  newline-delimited JSON: `{"text": "..."}` pieces, then `{"done": true, "finish_reason": "stop"|"length",
  "prompt_tokens": N, "completion_tokens": M}`.

The self-check renders a short chat through the tokenizer saved with the job's output, which is the chat
template training used, generates greedily, and passes when at least one token came out and generation
ended on the template's end-of-turn token (`end_of_turn_token`). Generation always stops on that token,
as training taught the model (trainer_worker.recipes.base.save puts it among the saved eos ids).

With `"serve": false` (VLLM deployments) the process exits after the check. It exits too when its parent
goes (PR_SET_PDEATHSIG from the parent, and a watch of the parent pid).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge_core.reasons import Reason

log = logging.getLogger("tuneforge.serving.runner")

_MARKER = "TUNEFORGE_END_OF_ANSWER"


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the chat template puts right after an assistant message (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>), or None when the template has none.

    The same rule as trainer_worker.recipes.base.end_of_turn_token (tests/serving checks they agree),
    kept here so the model process does not import the training stack (TRL, datasets) to start."""
    if not tokenizer.chat_template:
        return None
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARKER}], tokenize=False
    )
    after = str(rendered).split(_MARKER, 1)[-1].lstrip()
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((token for token in specials if token and after.startswith(token)), None)


def die_with_parent() -> None:
    """SIGTERM when the serving process that started this one dies (Linux PR_SET_PDEATHSIG); exits at
    once when it is already gone (it died before the call)."""
    parent = os.environ.get("TUNEFORGE_SERVING_PARENT_PID", "")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):
        raise SystemExit(0)


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class LoadError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Generation:
    """One request's generation, run on a thread; `pieces` hands the decoded text to the event loop."""

    text_parts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = "length"


class Model:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.work_dir = Path(config["work_dir"])
        self.tokenizer: Any = None
        self.model: Any = None
        self.end_of_turn: str | None = None
        self.stop_ids: list[int] = []
        self.device = "cpu"

    # -- loading ----------------------------------------------------------------------------------------

    def _store(self) -> Any:
        from tuneforge_core.storage import open_store

        storage = self.config["storage"]
        return open_store(storage["url"], endpoint_url=storage.get("s3_endpoint_url", ""),
                          region=storage.get("s3_region", "us-east-1"))

    def _fetch(self, store: Any, key: str, dest: Path) -> Path:
        if (dest / ".complete").exists():
            return dest
        log.info("fetching %s", key)
        try:
            store.get_dir(key, dest)
        except FileNotFoundError as exc:
            raise LoadError("MODEL_NOT_FOUND", f"nothing is stored at {key}") from exc
        if not dest.is_dir() or not any(dest.iterdir()):
            raise LoadError("MODEL_NOT_FOUND", f"nothing is stored at {key}")
        (dest / ".complete").touch()
        return dest

    def _base_path(self, store: Any) -> str:
        base = self.config["base_model"]
        if base["kind"] == "stored":
            return str(self._fetch(store, base["key"], self.work_dir / "base"))
        return str(base["path"] or base["ref"])

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        store = self._store()
        model_dir = self._fetch(store, self.config["model_key"], self.work_dir / "model")
        is_adapter = (model_dir / "adapter_config.json").exists()
        try:
            # The tokenizer saved with the output: the chat template training used.
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
            if is_adapter:
                from peft import PeftModel

                base_path = self._base_path(store)
                log.info("loading the base model %s", base_path)
                base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=False,
                                                            use_safetensors=True)
                peft_model = PeftModel.from_pretrained(base, str(model_dir))
                try:
                    self.model = peft_model.merge_and_unload()
                except (AttributeError, ValueError, NotImplementedError):  # prompt tuning: nothing to merge
                    self.model = peft_model
            else:
                self.model = AutoModelForCausalLM.from_pretrained(
                    str(model_dir), dtype=dtype, trust_remote_code=False, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise LoadError("MODEL_NOT_FOUND", f"could not load the model: {exc}") from exc
        self.model.to(self.device)
        self.model.eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.end_of_turn = end_of_turn_token(self.tokenizer)
        ids = self.model.generation_config.eos_token_id
        stop = [i for i in (ids if isinstance(ids, list) else [ids]) if i is not None]
        for token in (self.end_of_turn, self.tokenizer.eos_token):
            if token:
                token_id = self.tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id not in stop:
                    stop.append(token_id)
        self.stop_ids = stop

    # -- generation -------------------------------------------------------------------------------------

    def encode(self, messages: list[dict[str, str]]) -> Any:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True).to(self.device)

    def generate_ids(self, messages: list[dict[str, str]], max_new_tokens: int, temperature: float,
                     top_p: float, streamer: Any = None,
                     cancelled: threading.Event | None = None) -> tuple[list[int], int]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            """Ends generation once nobody reads it (the caller left, or a stop sequence matched)."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = cancelled is not None and cancelled.is_set()
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        inputs = self.encode(messages)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": self.stop_ids,
                                  "pad_token_id": self.tokenizer.pad_token_id,
                                  "stopping_criteria": StoppingCriteriaList([Cancelled()])}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(**inputs, streamer=streamer, **kwargs)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        return [int(t) for t in out[0, prompt_tokens:].tolist()], prompt_tokens

    def self_check(self) -> dict[str, Any]:
        check = self.config["check"]
        prompt = check["prompt"]
        limit = int(check["max_new_tokens"])
        started = time.monotonic()
        ids, _ = self.generate_ids([{"role": "user", "content": prompt}], limit, 0.0, 1.0)
        # Padding after an early stop is not part of the answer.
        pad = self.tokenizer.pad_token_id
        eot_id = self.tokenizer.convert_tokens_to_ids(self.end_of_turn) if self.end_of_turn else None
        ended = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        answer_ids = ids if ended is None else ids[: ended + 1]
        if pad is not None and pad not in self.stop_ids:
            answer_ids = [t for t in answer_ids if t != pad]
        return {
            "loaded": True,
            "generated": len(answer_ids) > 0,
            "stopped_at_end_of_turn": bool(answer_ids) and eot_id is not None and answer_ids[-1] == eot_id,
            "end_of_turn_token": self.end_of_turn or "",
            "prompt": prompt,
            "answer": self.tokenizer.decode(answer_ids, skip_special_tokens=True),
            "tokens": len(answer_ids),
            "max_new_tokens": limit,
            "duration_s": time.monotonic() - started,
        }


def check_problem(check: dict[str, Any]) -> str:
    """Why a self-check failed, in a sentence; empty when it passed."""
    if not check["generated"]:
        return "the self-check generated no tokens"
    if not check["end_of_turn_token"]:
        return "the model's tokenizer has no chat template with an end-of-turn token to stop on"
    if not check["stopped_at_end_of_turn"]:
        return (f"the self-check did not stop at the end-of-turn token {check['end_of_turn_token']} within "
                f"{check['max_new_tokens']} tokens (the model may be undertrained)")
    return ""


class StopFilter:
    """Cuts the text at the first stop sequence, holding back what could be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False
        self.emitted = ""  # everything let through so far

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[: min(hits)], ""
        else:
            cut = max(0, len(self.buffer) - self.hold)
            out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        self.emitted += out
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        self.emitted += out
        return out


class Server:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.lock = asyncio.Lock()  # one generation at a time: they share the CPU (or GPU) anyway

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        from transformers import TextIteratorStreamer

        model = self.model
        streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        result: dict[str, Any] = {}
        cancelled = threading.Event()

        def work() -> None:
            try:
                ids, prompt_tokens = model.generate_ids(body["messages"], int(body["max_tokens"]),
                                                        float(body.get("temperature", 1.0)),
                                                        float(body.get("top_p", 1.0)), streamer, cancelled)
                result.update(ids=ids, prompt_tokens=prompt_tokens)
            except Exception as exc:  # reported to the caller below; the streamer must still end
                result["error"] = str(exc)
                streamer.end()

        loop = asyncio.get_running_loop()
        stops = StopFilter(list(body.get("stop") or []))
        async with self.lock:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            done = object()
            try:
                while True:
                    piece = await loop.run_in_executor(None, next, streamer, done)
                    if piece is done:
                        break
                    text = stops.feed(str(piece))
                    if text:
                        yield {"text": text}
                    if stops.stopped:
                        break
            finally:  # also when the caller went away: generation stops at the next token
                cancelled.set()
                await asyncio.to_thread(thread.join)
        tail = stops.flush()
        if tail:
            yield {"text": tail}
        if "error" in result:
            yield {"error": result["error"]}
            return
        ids = result["ids"]
        if stops.stopped:  # what was generated after the stop sequence is not part of the answer
            ids = ids[: len(model.tokenizer(stops.emitted, add_special_tokens=False)["input_ids"])]
        finish = "stop" if stops.stopped or (ids and ids[-1] in model.stop_ids) else "length"
        yield {"done": True, "finish_reason": finish, "prompt_tokens": result["prompt_tokens"],
               "completion_tokens": len(ids)}

    async def serve(self, host: str) -> None:
        from aiohttp import web

        async def generate(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            async for item in self.stream(body):
                await response.write((json.dumps(item) + "\n").encode())
            await response.write_eof()
            return response

        async def health(_request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/generate", generate)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        emit("listening", port=port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        parent = os.getppid()
        while not stop.is_set():
            if os.getppid() != parent:  # the parent died (PR_SET_PDEATHSIG covers most cases already)
                break
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                pass
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.serving.runner")
    parser.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = json.loads(args.config.read_text())
    Path(config["work_dir"]).mkdir(parents=True, exist_ok=True)
    model = Model(config)
    try:
        model.load()
    except LoadError as exc:
        emit("failed", reason=exc.reason, error=str(exc))
        return 1
    except Exception as exc:
        log.exception("loading failed")
        emit("failed", reason=Reason.MODEL_NOT_FOUND.value, error=f"could not load the model: {exc}")
        return 1
    try:
        check = model.self_check()
    except Exception as exc:
        log.exception("the self-check failed")
        emit("failed", reason=Reason.INTERNAL.value, error=f"the self-check could not run: {exc}")
        return 1
    problem = check_problem(check)
    emit("checked", check=check, error=problem)
    if problem or not config.get("serve", True):
        return 0 if not problem else 1
    asyncio.run(Server(model).serve(config.get("host", "127.0.0.1")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
