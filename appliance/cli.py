"""The ``appliance`` command line (a stable contract: docs, scripts and users rely on these names).

Heavy imports (numpy, ONNX Runtime, the converter) happen inside the command that needs them, so
``appliance --help`` and ``appliance check`` answer at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.config import ApplianceConfig

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
BITS_HELP = "4 for 4-bit weights (default: full precision)"

# What a user can cause (a missing bundle, a prompt too long, a bad parameter): one line, exit 2.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError)
EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    # --log-level works before or after the subcommand; SUPPRESS keeps a later default from
    # overwriting an earlier explicit value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", choices=LOG_LEVELS, type=str.upper, default=argparse.SUPPRESS,
        help="logging threshold (default INFO)",
    )
    parser = argparse.ArgumentParser(
        prog="appliance", parents=[common],
        description="Resident generative-AI engine for interactive installations (AXERA NPU or CPU twin).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common],
                         help="the resident engine: models, MQTT, the HTTP bridge (OpenAI API, console)")
    _add_config_option(run)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", parents=[common], help="one completion from a model bundle, streamed")
    chat.add_argument("--model", type=Path, required=True, metavar="DIR", help="bundle folder")
    chat.add_argument("--system", default=None, metavar="S", help="system prompt")
    chat.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 is greedy (default 0.7)")
    chat.add_argument("--max-tokens", type=int, default=256, metavar="N", help="default 256")
    chat.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (1: off)")
    chat.add_argument("--top-k", type=int, default=0, metavar="K", help="top-k sampling (0: off)")
    chat.add_argument("--seed", type=int, default=None, metavar="N", help="reproducible sampling")
    chat.add_argument("--backend", default="auto", choices=["auto", "axcl", "axengine", "onnx"])
    chat.add_argument("--device-id", type=int, default=0, metavar="N", help="NPU device (default 0)")
    chat.add_argument("prompt", metavar="PROMPT")
    chat.set_defaults(func=cmd_chat)

    models = sub.add_parser("models", parents=[common], help="install and convert models")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    demo = models_sub.add_parser(
        "demo", parents=[common], help="install + convert the demo model (SmolLM2-135M-Instruct) into models/"
    )
    demo.add_argument("--models-dir", type=Path, default=Path("models"), metavar="DIR", help="models/")
    demo.add_argument("--bits", type=int, choices=[4], default=None, help=BITS_HELP)
    demo.add_argument("--no-voice", action="store_true",
                      help="skip the CPU voice (Piper, GPL-3.0) and Whisper tiny.en")
    demo.set_defaults(func=cmd_models_demo)
    convert = models_sub.add_parser("convert", parents=[common], help="GGUF -> bundle")
    convert.add_argument("src", type=Path, metavar="SRC", help="a llama/qwen2/qwen3 GGUF file")
    convert.add_argument("dest", type=Path, metavar="DEST", help="the bundle folder to write")
    convert.add_argument("--bits", type=int, choices=[4], default=None, help=BITS_HELP)
    convert.add_argument(
        "--kv-cache-len", type=int, default=None, metavar="N", help="KV cache rows (default: the converter's)"
    )
    convert.add_argument("--force", action="store_true", help="replace an existing bundle")
    convert.set_defaults(func=cmd_models_convert)

    fetch = models_sub.add_parser(
        "fetch", parents=[common], help="download AXERA's compiled models (on the device) into bundles"
    )
    fetch.add_argument("ids", nargs="*", metavar="ID", help="catalog ids (see --list)")
    fetch.add_argument("--list", action="store_true", help="show the catalog and what is fetched")
    fetch.add_argument("--models-dir", type=Path, default=Path("models"), metavar="DIR", help="models/")
    fetch.add_argument("--config", "-c", type=Path, default=None, metavar="FILE",
                       help="add the models to this appliance.yaml (a .bak copy is kept)")
    fetch.add_argument("--default", default=None, metavar="ID",
                       help="make this model the default of its kind")
    fetch.set_defaults(func=cmd_models_fetch)

    check = sub.add_parser("check", parents=[common], help="validate the config and the models it lists")
    _add_config_option(check)
    check.set_defaults(func=cmd_check)
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", type=Path, default=None, metavar="FILE",
        help="config file (default: ./appliance.yaml if present, else built-in defaults)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    """The resident process, until SIGTERM or SIGINT."""
    from appliance.app import run
    from appliance.config import load_config

    return run(load_config(args.config))


def cmd_chat(args: argparse.Namespace) -> int:
    """One completion streamed to stdout; a summary line on stderr.

    A prompt that cannot fit the model's context is refused before the model loads.
    """
    from appliance.prompt_size import check_prompt_size
    from npu.llm.params import GenerationParams
    from npu.llm.runner import LLMRunner

    params = GenerationParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed,
    )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    check_prompt_size(args.model, messages, args.backend)
    runner = LLMRunner.load(args.model, backend=args.backend, device_id=args.device_id)
    last = None
    ends_with_newline = True
    for last in runner.stream_chat(messages, params):
        if last.text:
            sys.stdout.write(last.text)
            sys.stdout.flush()
            ends_with_newline = last.text.endswith("\n")
    if not ends_with_newline:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if last is not None:
        u = last.usage
        print(
            f"[{u.prompt_tokens} prompt tokens ({u.cached_tokens} cached), {u.completion_tokens} completion "
            f"tokens, finish: {last.finish_reason}, first token {last.prompt_ms:.0f} ms, "
            f"{last.generation_tps:.1f} tokens/s, {runner.backend}]",
            file=sys.stderr,
        )
    return 0


def cmd_models_demo(args: argparse.Namespace) -> int:
    from appliance.demo_model import ensure_demo_model

    print(ensure_demo_model(args.models_dir, bits=args.bits))
    if not args.no_voice:
        from appliance.demo_voice import ensure_demo_voice

        for folder in ensure_demo_voice(args.models_dir):
            print(folder)
    return 0


def cmd_models_convert(args: argparse.Namespace) -> int:
    from npu.convert import convert_gguf

    if args.dest.exists() and not args.force:
        raise FileExistsError(f"{args.dest} already exists; pass --force to replace it")
    extra = {} if args.kv_cache_len is None else {"kv_cache_len": args.kv_cache_len}
    started = time.monotonic()
    out = convert_gguf(Path(args.src), Path(args.dest), bits=args.bits, overwrite=args.force, **extra)
    print(f"{out} ({time.monotonic() - started:.1f} s)")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from appliance.fetch.command import catalog_table, run_fetch

    if args.list or not args.ids:
        print(catalog_table(args.models_dir))
        if not args.list:
            print("name the models to fetch, e.g. 'scripts/fetch_models qwen2.5-0.5b-instruct'",
                  file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    print(run_fetch(args.ids, args.models_dir, args.config, args.default), end="")
    if args.config is not None:
        print(f"# added to {args.config}; 'appliance check -c {args.config}' verifies the memory plan")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and print what it says; exit 1 when something is wrong."""
    from appliance.config import DEFAULT_FILE, ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    source = args.config or (Path(DEFAULT_FILE) if Path(DEFAULT_FILE).is_file() else None)
    print(f"config     {source.resolve() if source else 'built-in defaults (no ./appliance.yaml)'}: valid")
    m, h, e = config.mqtt, config.http, config.engine
    print(
        f"mqtt       {m.host}:{m.port}, base topic {m.base_topic!r}, client id {m.client_id!r}, "
        f"MQTT {'5' if m.protocol == 5 else '3.1.1'}, TLS {'on' if m.tls.enabled else 'off'}, "
        f"{'user ' + repr(m.username) if m.username else 'anonymous'}"
        f"{', shared group ' + repr(m.shared_group) if m.shared_group else ''}"
    )
    print(
        f"http       {f'{h.host}:{h.port}' if h.enabled else 'off'}"
        f"{', API key set' if h.api_key else ', no API key' if h.enabled else ''}"
    )
    print(f"device     backend {config.device.backend}, ids {config.device.ids}")
    print(
        f"engine     queue {e.queue_max}, request timeout {e.request_timeout:g} s, "
        f"step timeout {e.step_timeout:g} s, {e.max_active} active per device"
    )
    print(f"telemetry  every {config.telemetry.interval:g} s")
    ok = True
    for model in config.models:
        path = config.model_path(model)
        if not path.is_dir():
            state, ok = "MISSING (no such folder)", False
        elif (problem := bundle_problem(path, model.kind, model.runtime)) is not None:
            state, ok = problem, False
        else:
            state = "ok"
        flags = "".join([", default" if model.default else "", "" if model.preload else ", not preloaded"])
        print(f"model      {model.id} ({model.kind}, runtime {model.runtime}{flags}): {path}: {state}")
        if state == "ok" and model.kind in ("tts", "stt"):
            print(f"           {speech_backend(path, model.kind, model.runtime)[0]}")
        if state == "ok" and model.kind == "chat":
            groups, fine = bundle_groups(path, model.runtime)
            ok = ok and fine
            print(f"           {groups}")
    if not check_moderation(config):
        return 1
    if not ok:
        print("some models are missing or cannot run; 'appliance models demo' creates the demo one",
              file=sys.stderr)
        return 1
    check_personas(config)
    return 0 if check_cmm(config) else 1


def check_moderation(config: ApplianceConfig) -> bool:
    """Build the prompt gate as ``run`` does, reading the same word lists and curtain, so a file
    ``run`` cannot read fails here with the same message."""
    from prometheus_client import CollectorRegistry

    from appliance.config import ConfigError
    from appliance.gate import make_gate

    try:
        gate = make_gate(config, lambda *args, **kwargs: None, CollectorRegistry())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return False
    m = config.moderation
    if gate is None:
        print("moderation off")
    else:
        print(f"moderation {'on' if m.enabled else 'for some displays'}: blocklist "
              f"{config.config_path(m.blocklist) if m.blocklist else 'none'} "
              f"({gate.blocklist.size} words or phrases), "
              f"judge {'on' if m.judge else 'off'}, curtain "
              f"{config.config_path(m.curtain) if m.curtain else 'plain dark'}")
    return True


def check_personas(config: ApplianceConfig) -> None:
    """Print each persona with how much of its system prompt is kept warm, and each scene's schedule."""
    from datetime import datetime

    from tokenizers import Tokenizer

    from appliance.scenes import next_start
    from npu.llm.chat_template import ChatTemplate
    from npu.llm.layer_stack import find_bundle_files
    from npu.llm.model_args import ModelArgs
    from npu.llm.prompt_tokens import PromptEncoder

    models = {m.id: m for m in config.models}
    for persona in config.engine_personas():
        model = models[persona.model or ""]
        path = config.model_path(model)
        try:
            args = ModelArgs.load(path)
            chunk = find_bundle_files(path, args.num_hidden_layers, ".onnx").chunk
        except (OSError, ValueError):
            chunk = 128
        # The prefix as the runner keeps it: the system message through the model's chat template.
        encoder = PromptEncoder(Tokenizer.from_file(str(path / "tokenizer.json")))
        tokens = len(encoder.encode_chat(ChatTemplate.from_bundle(path),
                                         [{"role": "system", "content": persona.system}],
                                         add_generation_prompt=False))
        warm = tokens // chunk * chunk
        note = (f"{warm} tokens kept warm" if warm else
                f"SHORTER THAN ONE PREFILL CHUNK ({chunk} tokens): nothing is kept warm; a longer system "
                "prompt would start faster")
        print(f"persona    {persona.name} on {model.id}: system prompt {tokens} tokens, {note}")
    now = datetime.now().astimezone()
    for scene in config.scenes:
        start = next_start(scene, now)
        when = f"starts '{scene.start}', next {start:%a %d %b %Y %H:%M}" if start else "only by request"
        personas = ", ".join(scene.personas) if scene.personas is not None else "all"
        extra = "".join([f", default {scene.default_persona}" if scene.default_persona else "",
                         f", loads {', '.join(scene.load)}" if scene.load else "",
                         f", unloads {', '.join(scene.unload)}" if scene.unload else ""])
        print(f"scene      {scene.name}: {when}; personas {personas}{extra}")


def bundle_problem(path: Path, kind: str, runtime: str = "auto") -> str | None:
    """Why ``path`` is not a bundle of this kind, or None."""
    if kind == "image":
        from npu.diffusion.bundle import find_files

        ext = ".axmodel" if any(path.rglob("*.axmodel")) else ".onnx"
        try:
            find_files(path, ext)
        except FileNotFoundError as exc:
            return f"NOT AN IMAGE BUNDLE ({exc})"
        return None
    if kind in ("tts", "stt"):
        text, fine = speech_backend(path, kind, runtime)
        return None if fine else text
    if not (path / "config.json").is_file():
        return "NOT A BUNDLE (no config.json)"
    return None


def speech_backend(path: Path, kind: str, runtime: str) -> tuple[str, bool]:
    """Which backend serves a tts or stt folder here (``served by ...``), or why none can."""
    from npu.runtime import BackendUnavailableError
    from npu.speech.transcribers import transcriber_backend
    from npu.speech.voices import voice_backend

    try:
        backend, why = (voice_backend if kind == "tts" else transcriber_backend)(path, runtime)
    except BackendUnavailableError as exc:  # a card model on a host without the card
        return f"served on the card (not here: {_one_line(str(exc))})", True
    except (OSError, ValueError, RuntimeError) as exc:
        label = "NOT A VOICE" if kind == "tts" else "NOT A SPEECH MODEL"
        return f"{label} ({_one_line(str(exc))})", False
    return f"served by {backend} ({why})", True


def bundle_groups(path: Path, runtime: str) -> tuple[str, bool]:
    """What a chat bundle's layers declare, read by opening each in turn; False if it cannot run."""
    from npu.llm.layer_stack import describe_bundle
    from npu.llm.shape_groups import BundleShapeError
    from npu.runtime import BackendUnavailableError

    try:
        return f"groups: {describe_bundle(path, runtime)}", True
    except BackendUnavailableError as exc:  # an NPU bundle on a host without the card
        return f"groups not read here ({_one_line(str(exc))}); the runner reads them when it loads", True
    except (BundleShapeError, OSError, ValueError, RuntimeError) as exc:
        return f"CANNOT RUN: {_one_line(str(exc))}", False


def check_cmm(config: ApplianceConfig) -> bool:
    """Print, per card, the preloaded models' CMM need against the card's CMM; False if it cannot fit."""
    from appliance.device_monitor import make_device_monitor
    from npu.device.cmm_plan import CmmPlan, bundle_mib

    sizes = {m.id: bundle_mib(config.model_path(m)) for m in config.models}
    # What is resident at the start, and during each scene (its loads in, its unloads out).
    sets = [("", config.resident_models())] + [(f" in scene {s.name}", config.resident_models(s))
                                               for s in config.scenes]
    monitor = make_device_monitor(config)
    fits = True
    try:
        for device in config.device.ids:
            reading = monitor.read(device)
            for label, resident in sets:
                needs = {m.id: sizes[m.id] for m in resident}
                plan = CmmPlan(needs, reading.cmm_total_mib, reading.cmm_free_mib)
                print(f"cmm        device {device} ({monitor.name}){label}: {plan.describe()}")
                fits = fits and plan.fits is not False
    finally:
        monitor.close()
    if not fits:
        print("the models do not fit the card's CMM: choose smaller models or fewer preloaded ones",
              file=sys.stderr)
    return fits


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or "error"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``appliance`` and ``python -m appliance``; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    level = getattr(args, "log_level", "INFO")
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")
    # APScheduler logs two INFO lines per job run (every 2 s): a journal of nothing else within
    # days. Its warnings and errors still show; DEBUG shows everything.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    from appliance.config import ConfigError

    func: Callable[[argparse.Namespace], int] = args.func
    name = " ".join(filter(None, (args.command, getattr(args, "models_command", None))))
    try:
        return func(args)
    except ConfigError as exc:
        print(f"appliance {name}: {exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        logger.debug("%s failed", name, exc_info=True)
        print(f"appliance {name}: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
