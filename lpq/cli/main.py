"""The ``lpq`` command line: a thin layer over the Python API in ``lpq.api``."""

from __future__ import annotations

import json
import sys

import click

from .. import api
from ..errors import LpqError
from ..models.loading import DEFAULT_MODEL
from ..progress import console, info, set_quiet

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="lpq")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines.")
def cli(quiet: bool) -> None:
    """lpq: quantize causal language models to 2-8 bits, save them packed, run and evaluate them."""
    set_quiet(quiet)


def _parse_options(pairs: tuple[str, ...]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise LpqError(f"--option {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


@cli.command(context_settings=CONTEXT)
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--method", default="rtn", show_default=True, help="Quantization method (rtn, gptq, ...).")
@click.option("--bits", type=float, default=4, show_default=True,
              help="Code width: 2, 3, 4 or 8; with --mixed, the average budget in bits per weight (e.g. 2.5), overheads counted.")
@click.option("--group-size", type=int, default=128, show_default=True, help="Inputs per scale/zero; -1 = per output channel.")
@click.option("--sym/--asym", default=False, show_default=True, help="Symmetric grid or asymmetric min-max.")
@click.option("--act-order", is_flag=True, help="GPTQ: quantize columns by decreasing Hessian diagonal (stores g_idx).")
@click.option("--static-groups", is_flag=True, default=None, help="GPTQ: fix group grids before act-order permutation.")
@click.option("--damp", type=float, default=None, help="GPTQ: dampening as a fraction of the mean Hessian diagonal (0.01).")
@click.option("--true-sequential/--no-true-sequential", default=None, help="GPTQ: quantize a block's linears stage by stage (default on).")
@click.option("--mse", is_flag=True, default=None, help="Fit each group's grid by searching the clipping range that minimises the rounding error (rtn, gptq).")
@click.option("--fp-targets", type=float, default=None, metavar="ALPHA",
              help="GPTQ: fit each layer to the full-precision model's outputs (1 = fully, 0 = off; costs a second calibration stream).")
@click.option("--outliers", type=float, default=None, metavar="PERCENT",
              help="SqueezeLLM: share of weights kept exactly as magnitude outliers (0.40).")
@click.option("--sensitive", type=float, default=None, metavar="PERCENT",
              help="SqueezeLLM: share of weights kept exactly for the largest Fisher values (0.05).")
@click.option("--salient-ratio", type=float, default=None, metavar="R",
              help="PTQ1.61: share of input channels kept at 4 bits (0.20); the rest is binarized.")
@click.option("--preprocess/--no-preprocess", default=None,
              help="PTQ1.61: restorative LoRA before quantization (off): adapters trained on the closed-form "
                   "quantized model, merged (--option preprocess_merge=original: into the unquantized weights).")
@click.option("--epochs", type=int, default=None, help="PTQ1.61: epochs of block-wise scale optimisation (20).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Another method option (repeatable).")
@click.option("--ignore", multiple=True, metavar="PATTERN", help="Leave linears whose qualified name matches this glob unquantized (repeatable).")
@click.option("--calib", default=None, metavar="FILE|wikitext2|self", help="Calibration text; default: sampled from the model (self).")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib-batch-size", type=int, default=1, show_default=True, help="Calibration windows per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (the model stays on the CPU; blocks stream through).")
@click.option("--dtype", default="auto", show_default=True, help="auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16.")
@click.option("--out", "out", default=None, help="Output directory [default: out/<model>-<method>-w<bits>-g<group>].")
@click.option("--format", "save_format", type=click.Choice(["lpq", "gptq"]), default="lpq", show_default=True,
              help="lpq's own directory, or a GPTQ (v1) checkpoint for tools that read GPTQ.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished block.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model's own Python code to run.")
@click.option("--mixed", type=click.Choice(["hessian"]), default=None,
              help="Mixed precision: give each linear the width that minimises sensitivity x perturbation within the --bits / --target-size budget.")
@click.option("--sensitivity", type=click.Choice(["hutchinson", "fisher", "gptq"]), default="hutchinson", show_default=True,
              help="--mixed: Hessian trace (Hutchinson), squared gradients (fisher) or input-Hessian trace (gptq, cheapest).")
@click.option("--target-size", default=None, metavar="SIZE",
              help="--mixed: budget as the stored size of the quantized linears (1.2GB, 300MB, 512MiB; embeddings and norms not counted).")
@click.option("--candidates", default=None, metavar="B:G,...",
              help="--mixed: widths to choose from, BITS[:GROUP] [default: 2,3,4,8 at --group-size].")
@click.option("--tie", multiple=True, metavar="A,B,...",
              help="--mixed: layers with these name endings under one parent share a width (e.g. q_proj,k_proj,v_proj; repeatable).")
@click.option("--probes", type=int, default=4, show_default=True, help="--mixed hutchinson: probe vectors per calibration window.")
@click.option("--sensitivity-samples", type=int, default=8, show_default=True,
              help="--mixed: calibration windows the sensitivity and the per-width costs are measured on.")
@click.option("--mixed-cost", type=click.Choice(["weight", "output"]), default="output", show_default=True,
              help="--mixed: the perturbation each sensitivity multiplies: ||dW||^2 (weight) or the layer-output error K tr(dW A dW^T)/tr(A), A the input second moment (output).")
@click.option("--rotate", is_flag=True, default=None,
              help="Rotate the residual stream by a random Hadamard-type matrix before quantizing (exact for Llama, "
                   "Mistral, Qwen2, Gemma; unties a tied lm_head): spreads outlier channels, helps GPTQ at 3 bits, can hurt RTN.")
@click.option("--rotate-heads", is_flag=True, default=None,
              help="With --rotate (an error without it): also rotate each attention block's value heads and "
                   "o_proj's matching input columns by Hadamard-type matrices (exact; refused for a norm on the values).")
@click.option("--recipe", default=None, metavar="FILE", help="YAML of quantize options (recipes/); flags given here win.")
@click.option("--save-recipe", default=None, metavar="FILE", help="Write this run's options as a recipe.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.pass_context
def quantize(ctx, model, method, bits, group_size, sym, act_order, static_groups, damp, true_sequential, mse, fp_targets,
             outliers, sensitive, salient_ratio, preprocess, epochs, options, ignore,
             calib, nsamples, seqlen, seed, calib_batch_size, device, dtype, out, save_format, overwrite, resume,
             max_shard_size, trust_remote_code, mixed, sensitivity, target_size, candidates, tie, probes,
             sensitivity_samples, mixed_cost, rotate, rotate_heads, recipe, save_recipe, as_json):
    """Quantize MODEL (built-in name, directory, .gguf file or hub id) and save it packed."""
    from click.core import ParameterSource

    from ..recipe import load_recipe, save_recipe as write_recipe

    overrides = {}
    if recipe:
        given = {name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
        plan = load_recipe(recipe)
        overrides = plan.pop("overrides", {}) or {}
        recipe_options = plan.pop("method_options", {}) or {}
        plan.pop("mixed_plan", None)  # the record of how a saved plan was chosen; its overrides are the plan
        if "model" not in given and "model" in plan:
            model = plan["model"]
        local = {"method": method, "bits": bits, "group_size": group_size, "sym": sym, "act_order": act_order,
                 "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "dtype": dtype,
                 "calib_batch_size": calib_batch_size, "ignore": ignore, "mixed": mixed, "sensitivity": sensitivity,
                 "target_size": target_size, "candidates": candidates, "tie": tie, "probes": probes,
                 "sensitivity_samples": sensitivity_samples, "mixed_cost": mixed_cost, "rotate": rotate,
                 "rotate_heads": rotate_heads}
        for key in local:
            if key in plan and key not in given:
                local[key] = plan[key]
        method, bits, group_size, sym, act_order = (local[k] for k in ("method", "bits", "group_size", "sym", "act_order"))
        calib, nsamples, seqlen, seed, dtype = (local[k] for k in ("calib", "nsamples", "seqlen", "seed", "dtype"))
        calib_batch_size, ignore = local["calib_batch_size"], tuple(local["ignore"] or ())
        mixed, sensitivity, target_size = local["mixed"], local["sensitivity"], local["target_size"]
        candidates, probes, sensitivity_samples = local["candidates"], local["probes"], local["sensitivity_samples"]
        mixed_cost, rotate, rotate_heads = local["mixed_cost"], local["rotate"], local["rotate_heads"]
        tie = tuple([local["tie"]] if isinstance(local["tie"], str) else (local["tie"] or ()))
        options = tuple(f"{k}={json.dumps(v)}" for k, v in recipe_options.items()) + tuple(options)
    method_options = _parse_options(options)
    for key, value in (("static_groups", static_groups), ("damp", damp), ("true_sequential", true_sequential),
                       ("mse", mse), ("fp_targets", fp_targets), ("outliers", outliers), ("sensitive", sensitive),
                       ("salient_ratio", salient_ratio), ("preprocess", preprocess), ("epochs", epochs)):
        if value is not None:
            method_options[key] = value
    if mixed is None:
        if target_size is not None:
            raise LpqError("--target-size needs --mixed hessian (a size is met by mixing widths)")
        if float(bits) != int(bits):
            raise LpqError(f"--bits {bits:g} is not a whole width: fractional budgets need --mixed hessian")
        bits = int(bits)
    elif target_size is None and float(bits).is_integer():
        bits = int(bits)  # an average of exactly 3 bits: keep the recipe and folder name tidy
    if out is None:
        g = "pc" if group_size == -1 else f"g{group_size}"
        stem = model.rstrip("/").split("/")[-1].removesuffix(".gguf")
        if mixed is None:
            out = f"out/{stem}-{method}-w{bits}-{g}"
        else:
            out = f"out/{stem}-{method}-mixed-{target_size or f'w{bits:g}'}-{sensitivity}"
            out += "-weightcost" if mixed_cost == "weight" else ""
    run_options = dict(method=method, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                       method_options=method_options, ignore=list(ignore), overrides=overrides, calib=calib,
                       nsamples=nsamples, seqlen=seqlen, seed=seed, calib_batch_size=calib_batch_size, dtype=dtype)
    if rotate:  # only when used, so that recipes of unrotated runs stay as they were
        run_options["rotate"] = True
    if rotate_heads:
        run_options["rotate_heads"] = True
    if mixed is not None:
        run_options.update(mixed=mixed, sensitivity=sensitivity, target_size=target_size, candidates=candidates,
                           tie=list(tie), probes=probes, sensitivity_samples=sensitivity_samples, mixed_cost=mixed_cost)
    result = api.quantize(model, out, device=device, resume=resume, overwrite=overwrite, max_shard_size=max_shard_size,
                          trust_remote_code=trust_remote_code, save_format=save_format, **run_options)
    if save_recipe and result.plan is not None:
        from ..mixed.plan import write_plan_recipe

        write_plan_recipe(save_recipe, {"model": model, **run_options}, result.plan)
    elif save_recipe:
        write_recipe(save_recipe, {"model": model, **run_options})
    from ..inspect import inspect as inspect_dir

    report = inspect_dir(result.out) if save_format == "lpq" else {"bpw": None, "total_bytes": None, "size_vs_fp16": None}
    summary = {"out": str(result.out), "layers": result.layers, "bpw": report["bpw"],
               "size_bytes": report["total_bytes"], "seconds": result.seconds, "peak_memory_gb": result.peak_memory_gb}
    if result.plan is not None:
        summary["mixed"] = {"budget_bytes": result.plan.budget_bytes, "quantized_bytes": report.get("quantized_bytes"),
                            "sensitivity": result.plan.sensitivity, "cost": result.plan.cost, "widths": result.plan.widths(),
                            "stability": result.plan.stability, "exact": result.plan.exact}
    if as_json:
        _print_json(summary)
    elif save_format != "lpq":
        info(f"wrote {result.out} ({save_format} checkpoint, {result.layers} layers) in {result.seconds['total']:.1f} s")
    else:
        info(f"wrote {result.out}: {result.layers} layers at {report['bpw']:.3f} bits per weight, "
             f"{report['total_bytes'] / 1e6:.1f} MB ({report['size_vs_fp16']:.1%} of fp16) in {result.seconds['total']:.1f} s")


@cli.command(context_settings=CONTEXT)
@click.argument("directory")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(directory, as_json):
    """Per-layer method, bits, group size and bytes of a packed DIRECTORY; average bits per weight."""
    from rich.table import Table

    from ..inspect import inspect as inspect_dir

    report = inspect_dir(directory)
    if as_json:
        _print_json(report)
        return
    mixed = report.get("mixed")
    table = Table(title=f"{directory} ({report['method']}{', mixed precision' if mixed else ''})")
    cols = ["layer", "method", "bits", "group", "shape (out x in)", "bytes", "bpw"] + (["sensitivity"] if mixed else [])
    for col in cols:
        table.add_column(col, justify="left" if col == "layer" else "right")
    for layer in report["layers"]:
        g = "per-ch" if layer["group_size"] == -1 else str(layer["group_size"])
        row = [layer["name"], layer["method"], str(layer["bits"]), g,
               f"{layer['out_features']} x {layer['in_features']}", f"{layer['bytes']:,}", f"{layer['bpw']:.3f}"]
        if mixed:
            row.append("-" if layer.get("sensitivity") is None else f"{layer['sensitivity']:.3g}")
        table.add_row(*row)
    out = console.__class__(highlight=False, width=max(console.width, 140) if not console.is_terminal else None)
    out.print(table)
    out.print(
        f"quantized layers: {report['quantized_layers']}, average {report['bpw']:.3f} bits per weight "
        f"(scales, zeros and every other overhead counted)\n"
        f"whole model: {report['total_bytes'] / 1e6:.1f} MB, {report['model_bpw']:.3f} bits per parameter, "
        f"{report['size_vs_fp16']:.1%} of fp16 ({report['fp16_bytes'] / 1e6:.1f} MB)"
    )
    if len(report.get("widths", {})) > 1 or mixed:
        out.print("widths: " + ", ".join(f"{k}: {v['layers']} layers ({v['weights'] / report['quantized_weights']:.1%} of weights)"
                                         for k, v in report["widths"].items()))
    if mixed:
        out.print(f"mixed precision: {mixed.get('sensitivity')} sensitivity, budget {mixed.get('budget')}")


@cli.group(name="eval", context_settings=CONTEXT)
def eval_group():
    """Evaluate a model: perplexity on a text, or KL divergence to a reference model."""


def _eval_options(f):
    for opt in reversed([
        click.option("--text", default="wikitext2", show_default=True, metavar="FILE|wikitext2", help="Evaluation text."),
        click.option("--seqlen", type=int, default=2048, show_default=True, help="Window length in tokens."),
        click.option("--windows", type=int, default=None, help="Evaluate only the first N windows [default: all]."),
        click.option("--batch-size", type=int, default=1, show_default=True, help="Windows per forward pass."),
        click.option("--device", default="auto", show_default=True),
        click.option("--dtype", default="auto", show_default=True, help="auto: float32 on CPU, float16 on GPU."),
        click.option("--trust-remote-code", is_flag=True),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]):
        f = opt(f)
    return f


@eval_group.command(context_settings=CONTEXT)
@click.argument("model")
@_eval_options
def perplexity(model, text, seqlen, windows, batch_size, device, dtype, trust_remote_code, as_json):
    """Perplexity of MODEL (packed directory or any model lpq can load) on a text."""
    from .. import evaluate

    body = evaluate.load_eval_text(text)
    m, tok = api.load_any(model, device, dtype, trust_remote_code)
    res = evaluate.perplexity(m, tok, body, seqlen, windows, batch_size)
    if as_json:
        _print_json({"model": model, **res.to_dict()})
    else:
        click.echo(f"perplexity {res.perplexity:.4f} ({res.windows} windows of {res.seqlen}, {res.tokens} tokens)")


@eval_group.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--reference", required=True, help="The unquantized model to compare with.")
@_eval_options
def kl(model, reference, text, seqlen, windows, batch_size, device, dtype, trust_remote_code, as_json):
    """Mean KL(reference || MODEL) per token and the share of changed top-1 predictions."""
    from .. import evaluate

    body = evaluate.load_eval_text(text)
    m, tok = api.load_any(model, device, dtype, trust_remote_code)
    ref, _ = api.load_any(reference, device, dtype, trust_remote_code)
    res = evaluate.kl_divergence(m, ref, tok, body, seqlen, windows, batch_size)
    if as_json:
        _print_json({"model": model, "reference": reference, **res.to_dict()})
    else:
        click.echo(f"KL {res.kl:.5f} nats/token, top-1 changed {res.top1_changed:.2%} "
                   f"({res.windows} windows of {res.seqlen}, {res.tokens} tokens)")


@cli.command(context_settings=CONTEXT)
@click.argument("results", nargs=-1, required=True)
@click.option("--out", "out", default="pareto.png", show_default=True, help="PNG to write.")
@click.option("--title", default="", help="Plot title.")
@click.option("--linear-y", is_flag=True, help="Linear perplexity axis [default: logarithmic].")
@click.option("--max-bpw", type=float, default=None, help="Leave out points above this many bits per weight.")
def plot(results, out, title, linear_y, max_bpw):
    """Perplexity against bits per weight from bench results json files (PNG; needs matplotlib, not a dependency)."""
    from ..mixed.plot import group_series, plot_records, read_records

    records = read_records(list(results))
    for name, pts in group_series(records).items():
        info(f"{name}: " + ", ".join(f"{x:.3f} bpw -> {y:.2f}" for x, y, _ in pts))
    path = plot_records(records, out, title=title, log_y=not linear_y, max_bpw=max_bpw)
    info(f"wrote {path}")


from .finetune import finetune as finetune_command  # noqa: E402  (the `lpq finetune` command)

cli.add_command(finetune_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, without a traceback."""
    import torch

    try:
        cli.main(args=argv, prog_name="lpq", standalone_mode=False)
    except LpqError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted: nothing was written to the output directory; finished blocks are kept for --resume", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written to the output directory; finished blocks are kept for --resume", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except torch.OutOfMemoryError:
        click.echo("error: out of memory: use --device cpu, a smaller --nsamples or --calib-batch-size, or a smaller --batch-size", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
