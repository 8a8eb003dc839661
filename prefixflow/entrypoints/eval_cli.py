"""`prefixflow eval`: lm-evaluation-harness tasks on the engine, in one process.

lm-eval's usual arguments, under lm-eval's names (--num_fewshot, or --num-fewshot), with
lm-eval's meanings: they build lm-eval's own EvaluatorConfig, which checks them as
`lm-eval run` does. The engine flags are those of run-batch and serve (--model, --dtype,
--kv-cache-memory, ...); --model_args gives PrefixflowLM's own (max_length, add_bos_token,
max_gen_toks, ...) and engine options too, over the flags. --seed is lm-eval's four seeds;
the engine's seed is its torch seed (or model_args seed=N).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from prefixflow.config import engine_options
from prefixflow.entrypoints.engine_args import add_engine_arguments

EXAMPLE = """example:
  prefixflow eval --tasks hellaswag --num_fewshot 5 --dtype float32
  prefixflow eval --include_path my_tasks/ --tasks my_task --limit 10 --model path/to/model
"""


def _fail(msg: str) -> int:
    print(f"prefixflow: error: {msg}", file=sys.stderr)
    return 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """lm-eval's arguments, then the engine's flags; lm-eval's --seed replaces the engine's
    (conflict_handler "resolve")."""
    parser.epilog = EXAMPLE
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.conflict_handler = "resolve"
    g = parser.add_argument_group("lm-evaluation-harness (lm-eval run's arguments)")

    def arg(*names: str, **kw: Any) -> None:
        spelled = [*names, *(n.replace("_", "-") for n in names if "_" in n)]
        g.add_argument(*spelled, **kw)

    arg(
        "--tasks",
        "-t",
        nargs="+",
        required=True,
        metavar="TASK",
        help="task names, comma- or space-separated",
    )
    arg(
        "--model_args",
        "-a",
        nargs="+",
        help="PrefixflowLM's arguments and engine options, key=value,... or JSON "
        "(e.g. max_length=2048,add_bos_token=True); over the flags",
    )
    arg("--num_fewshot", "-f", type=int, help="examples in the few-shot context")
    arg("--limit", "-L", type=float, help="examples per task (a count, or a fraction below 1)")
    arg("--samples", "-E", help="JSON (or a JSON file) of doc indices per task; not with --limit")
    arg("--batch_size", "-b", help="accepted and unused: the engine forms its own batches")
    arg("--max_batch_size", type=int, help="accepted and unused")
    arg("--device", help="accepted and unused: the engine picks its device")
    arg(
        "--gen_kwargs", nargs="+", help="generation settings over the tasks', key=value,... or JSON"
    )
    arg("--output_path", "-o", help="folder or .json file for the results (and samples)")
    arg("--log_samples", "-s", action="store_true", help="save every request and response")
    arg("--predict_only", "-x", action="store_true", help="save outputs, compute no metric")
    arg(
        "--apply_chat_template",
        nargs="?",
        const=True,
        default=False,
        help="format prompts with the chat template (optionally its name)",
    )
    arg(
        "--fewshot_as_multiturn",
        nargs="?",
        const=True,
        type=lambda x: x.lower() in ("true", "1", "yes"),
        help="few-shot examples as turns of the conversation (default with a chat template)",
    )
    arg("--system_instruction", help="a system instruction before each prompt")
    arg("--include_path", help="a folder of your own task YAML files")
    arg("--use_cache", "-c", help="sqlite file that caches responses across runs")
    arg("--cache_requests", choices=["true", "refresh", "delete"], help="cache built requests")
    arg("--write_out", "-w", action="store_true", help="print the first documents' prompts")
    arg("--show_config", action="store_true", help="print the whole results JSON")
    arg("--bootstrap_iters", type=int, default=100000, help="bootstrap samples for stderr")
    arg("--metadata", nargs="+", help="task metadata, key=value,... or JSON")
    arg("--trust_remote_code", action="store_true", help="let datasets run their own code")
    arg("--confirm_run_unsafe_code", action="store_true", help="allow tasks that run code")
    arg("--verbosity", "-v", type=str.upper, help="lm-eval's log level (e.g. INFO)")
    add_engine_arguments(parser)
    arg(  # after the engine's flags: it replaces the engine's --seed
        "--seed",
        dest="lm_eval_seed",
        metavar="SEEDS",
        help="seeds of python, numpy, torch and few-shot sampling: one integer or four, "
        "'None' to leave one unset (default 0,1234,1234,1234); the engine takes torch's",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.utils import make_table

        from prefixflow.integrations.lm_eval import PrefixflowLM
    except ImportError as e:
        return _fail(
            f"prefixflow eval needs lm-evaluation-harness: pip install 'prefixflow[eval]' ({e})"
        )
    if args.verbosity:
        logging.getLogger("lm_eval").setLevel(args.verbosity)
    try:
        cfg = _evaluator_config(args)
        task_manager = _task_manager(cfg)
    except (ValueError, TypeError, OSError) as e:
        hint = ""
        if "not found" in str(e):
            hint = "; `lm-eval ls tasks` lists lm-eval's tasks, --include_path DIR adds yours"
        return _fail(f"{e}{hint}")
    options = {o.name: getattr(args, o.name) for o in engine_options() if o.name != "seed"}
    if cfg.seed and cfg.seed[2] is not None:
        options["seed"] = cfg.seed[2]  # the torch seed, as lm-eval's hf model samples by it
    options.update(cfg.model_args)
    options.pop("trust_remote_code", None)  # set by --trust_remote_code, for datasets
    try:
        t0 = time.perf_counter()
        lm = PrefixflowLM(**options)
    except (TypeError, ValueError, OSError) as e:
        return _fail(f"cannot load the model: {e}")
    print(
        f"prefixflow: {lm.llm.engine.model_name} "
        f"({str(lm.llm.engine.runner.dtype).removeprefix('torch.')}) loaded in "
        f"{time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    from lm_eval.loggers import EvaluationTracker

    if cfg.output_path:
        cfg.hf_hub_log_args["output_path"] = cfg.output_path
    tracker = EvaluationTracker(**cfg.hf_hub_log_args)
    seeds = cfg.seed or [None] * 4
    results = simple_evaluate(
        model=lm,
        model_args=cfg.model_args,
        tasks=cfg.tasks,
        num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size,
        max_batch_size=cfg.max_batch_size,
        device=cfg.device,
        use_cache=cfg.use_cache,
        cache_requests=cfg.cache_requests.get("cache_requests", False),
        rewrite_requests_cache=cfg.cache_requests.get("rewrite_requests_cache", False),
        delete_requests_cache=cfg.cache_requests.get("delete_requests_cache", False),
        limit=cfg.limit,
        samples=cfg.samples,
        bootstrap_iters=args.bootstrap_iters,
        write_out=cfg.write_out,
        log_samples=cfg.log_samples,
        evaluation_tracker=tracker,
        system_instruction=cfg.system_instruction,
        apply_chat_template=cfg.apply_chat_template,
        fewshot_as_multiturn=bool(cfg.fewshot_as_multiturn),
        gen_kwargs=cfg.gen_kwargs or None,
        task_manager=task_manager,
        predict_only=cfg.predict_only,
        random_seed=seeds[0],
        numpy_random_seed=seeds[1],
        torch_random_seed=seeds[2],
        fewshot_random_seed=seeds[3],
        confirm_run_unsafe_code=cfg.confirm_run_unsafe_code,
        metadata=cfg.metadata,
    )
    if results is None:
        return 1
    samples = results.pop("samples", None)
    if cfg.show_config:
        from lm_eval.utils import handle_non_serializable

        print(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    tracker.save_results_aggregated(results=results, samples=samples if cfg.log_samples else None)
    if cfg.log_samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(
        f"prefixflow ({lm.llm.engine.model_name}), model_args: {cfg.model_args or None}, "
        f"gen_kwargs: {cfg.gen_kwargs or None}, limit: {cfg.limit}, "
        f"num_fewshot: {cfg.num_fewshot}"
    )
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return 0


def _evaluator_config(args: argparse.Namespace):
    """lm-eval's own EvaluatorConfig of these arguments (its checks, its defaults)."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    seed = None
    if args.lm_eval_seed is not None:
        try:
            seed = [
                None if s.strip().lower() == "none" else int(s)
                for s in args.lm_eval_seed.split(",")
            ]
        except ValueError as e:
            raise ValueError(f"--seed takes integers or None, comma-separated: {e}") from e
    cache = args.cache_requests
    namespace = argparse.Namespace(
        model="prefixflow",
        model_args=_key_values(args.model_args),
        tasks=[t for item in args.tasks for t in item.split(",") if t],
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        max_batch_size=args.max_batch_size,
        device=args.device,
        limit=args.limit,
        samples=args.samples,
        use_cache=args.use_cache,
        cache_requests={
            "cache_requests": cache in ("true", "refresh"),
            "rewrite_requests_cache": cache == "refresh",
            "delete_requests_cache": cache == "delete",
        }
        if cache
        else None,
        write_out=args.write_out,
        log_samples=args.log_samples,
        output_path=args.output_path,
        predict_only=args.predict_only,
        system_instruction=args.system_instruction,
        apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn,
        show_config=args.show_config,
        include_path=args.include_path,
        gen_kwargs=_key_values(args.gen_kwargs),
        seed=seed,
        trust_remote_code=args.trust_remote_code,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        metadata=_key_values(args.metadata),
    )
    return EvaluatorConfig.from_cli(namespace)


def _task_manager(cfg):
    """lm-eval's TaskManager for the tasks asked, their names resolved into cfg.tasks
    (ValueError naming those not found). Tasks that all lie in --include_path skip the
    index of lm-eval's own thousands of task files (seconds)."""
    from lm_eval.tasks import TaskManager

    if cfg.include_path:
        local = TaskManager(
            include_path=cfg.include_path, include_defaults=False, metadata=cfg.metadata
        )
        if all(name in local.all_subtasks for name in cfg.tasks):
            return local
    return cfg.process_tasks(cfg.metadata)


def _key_values(values: list[str] | None) -> dict[str, Any]:
    """key=value,... items (lm-eval's parsing of each value) or JSON objects, merged."""
    from lm_eval.utils import simple_parse_args_string

    out: dict[str, Any] = {}
    for value in values or []:
        value = value.strip()
        if value.startswith("{"):
            try:
                out.update(json.loads(value))
            except json.JSONDecodeError as e:
                raise ValueError(f"cannot read {value!r} as JSON: {e}") from e
        else:
            out.update(simple_parse_args_string(value))
    return out
