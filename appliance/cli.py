"""The ``appliance`` command line (a stable contract: docs, scripts and users rely on these names)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_PROMPT = "In two sentences, what could an art installation do with a small language model?"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Resident generative-AI engine")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the resident engine: models, MQTT, HTTP, scheduler")
    run.add_argument(
        "-c", "--config", type=Path, default=None, help="config file (default: ./appliance.yaml)"
    )

    chat = sub.add_parser("chat", help="one completion from a model bundle, streamed")
    chat.add_argument("--model", type=Path, required=True, help="bundle folder")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--backend", default="auto", choices=["auto", "onnx", "axengine"])
    chat.add_argument("--device-id", type=int, default=0)
    chat.add_argument("prompt")

    models = sub.add_parser("models", help="install and convert models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    demo = models_sub.add_parser("demo", help="install and convert the demo model into models/")
    demo.add_argument("--models-dir", type=Path, default=Path("models"))
    demo.add_argument("--bits", type=int, choices=[4], default=None, help="4-bit weights")
    convert = models_sub.add_parser("convert", help="GGUF -> bundle")
    convert.add_argument("src", type=Path)
    convert.add_argument("dest", type=Path)
    convert.add_argument("--bits", type=int, choices=[4], default=None, help="4-bit weights")
    convert.add_argument("--kv-cache-len", type=int, default=2047)
    convert.add_argument("--force", action="store_true", help="replace an existing bundle")

    check = sub.add_parser("check", help="validate the config and the models it lists")
    check.add_argument("-c", "--config", type=Path, default=None)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.app import run
    from appliance.config import load_config

    return run(load_config(args.config))


def cmd_chat(args: argparse.Namespace) -> int:
    from npu.llm.params import GenerationParams
    from npu.llm.runner import LLMRunner

    params = GenerationParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    runner = LLMRunner.load(args.model, backend=args.backend, device_id=args.device_id)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    last = None
    for last in runner.stream_chat(messages, params):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if last is not None:
        u = last.usage
        print(
            f"[{u.prompt_tokens} prompt tokens ({u.cached_tokens} cached), {u.completion_tokens} generated, "
            f"finish: {last.finish_reason}, first token {last.prompt_ms:.0f} ms, "
            f"{last.generation_tps:.1f} tokens/s, {runner.backend}]",
            file=sys.stderr,
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.models_command == "demo":
        from appliance.demo_model import ensure_demo_model

        print(ensure_demo_model(args.models_dir, bits=args.bits))
        return 0
    from npu.convert import convert_gguf

    started = time.monotonic()
    out = convert_gguf(
        args.src, args.dest, bits=args.bits, kv_cache_len=args.kv_cache_len, overwrite=args.force
    )
    print(f"{out} ({time.monotonic() - started:.1f} s)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from appliance.config import load_config

    config = load_config(args.config)
    ok = True
    print(f"config: {(args.config or Path('appliance.yaml'))} (valid)")
    print(
        f"mqtt: {config.mqtt.host}:{config.mqtt.port} base topic {config.mqtt.base_topic!r}, "
        f"MQTT {'5' if config.mqtt.protocol == 5 else '3.1.1'}, client id {config.mqtt.client_id}"
    )
    print(f"http: {'on ' + config.http.host + ':' + str(config.http.port) if config.http.enabled else 'off'}")
    print(f"device: {config.device.backend}, ids {config.device.ids}")
    if not config.models:
        print("models: none listed")
        ok = False
    for model in config.models:
        path = config.model_path(model)
        state = "ok" if (path / "config.json").is_file() else "MISSING (no config.json)"
        ok &= state == "ok"
        print(f"model {model.id} ({model.kind}, runtime {model.runtime}): {path} {state}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from appliance.config import ConfigError

    commands = {"run": cmd_run, "chat": cmd_chat, "models": cmd_models, "check": cmd_check}
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
