"""MMLU, 5-shot, scored like lm-evaluation-harness: argmax log-likelihood of " A".." D".

The data layouts, the harness's prompt and the log-likelihood scorer live in xfusion.mmlu
(shared with the tiny base LM's own check, xfusion.pretrain_lm); this module adds the models
and the metric file. X-Fusion Table 1 / Supp. Table A report MMLU to show the frozen text tower
is intact. Accuracy = mean over all questions ("value"); `details.per_subject` and
`details.macro` (mean over subjects) as well.

Frozen text towers give bit-identical text logits, hence identical MMLU: with `--base-result
R/metrics/base/<name>/mmlu.json`, a run whose model preserves text (`XFusionModel.
preserves_text`: frozen text weights, no gate on text) and whose model dir names a base model
with the same `text_weight_hash` copies the base's score (`details.reused_from`); any other run
is scored.

    python -m eval.mmlu --config C --base-lm R/base_lm/<name>/base_model.json --data R/world/mmlu \
        --out R/metrics/base/<name>/mmlu.json
    python -m eval.mmlu --config C --run RUN --step STEP --model R/runs/RUN/steps/STEP \
        --data R/world/mmlu [--base-result R/metrics/base/<name>/mmlu.json] --out .../mmlu.json
"""

from __future__ import annotations

import json
from pathlib import Path

from eval.common import device, load_config, load_xfusion, metric_parser, write_metric
from xfusion.config import recipe_hash
from xfusion.mmlu import causal_lm_loglik, evaluate_mmlu, load_mmlu


# --- models -------------------------------------------------------------------------------------

def base_lm_scorer(base_model_json: str | Path, batch_size: int):
    from xfusion.model.base import load_base_llm
    llm, tokenizer = load_base_llm(base_model_json)
    llm = llm.eval().to(device())
    fn = causal_lm_loglik(lambda ids, mask: llm(input_ids=ids, attention_mask=mask).logits,
                          llm.config.max_position_embeddings, batch_size)
    return tokenizer, fn


def main(argv: list[str] | None = None) -> dict:
    p = metric_parser(__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an X-Fusion model dir (R/runs/RUN/steps/STEP)")
    src.add_argument("--base-lm", help="R/base_lm/<name>/base_model.json")
    p.add_argument("--data", default=None, help="MMLU root (default: evaluation.mmlu_path)")
    p.add_argument("--base-result", default=None, help="the base model's mmlu.json, reused for "
                   "runs whose text path is frozen and whose text_weight_hash matches")
    p.set_defaults(batch_size=8)
    args = p.parse_args(argv)
    cfg = load_config(args)
    data_path = args.data or cfg.evaluation.mmlu_path
    if data_path is None:
        raise SystemExit("no MMLU data: pass --data (tiny: R/world/mmlu) or set "
                         "evaluation.mmlu_path")
    base_json = Path(args.model) / "base_model.json" if args.model else Path(args.base_lm)
    text_hash = json.loads(base_json.read_text())["text_weight_hash"]
    # The base LLM's score (--base-lm) and a run's (--model) read the same settings.
    job = "mmlu" if args.model else "mmlu_base"
    common = dict(cfg=cfg, job=job, run=args.run, step=args.step)
    if args.model:
        model, tokenizer = load_xfusion(args.model)
        # The model itself says whether its text-only logits are the base's (frozen text
        # weights, no gate on text positions); the hash says which base model that is.
        if args.base_result and Path(args.base_result).exists() and model.preserves_text:
            base = json.loads(Path(args.base_result).read_text())
            same_settings = base.get("recipe", {}).get("eval") == recipe_hash(cfg, job)
            if base["details"].get("text_weight_hash") == text_hash and same_settings:
                reused = base["details"] | {"reused_from": str(args.base_result)}
                return write_metric(args.out, "mmlu", base["value"], n=base["n"], **common,
                                    details=reused)
        loglik = causal_lm_loglik(model.text_logits, model.llm.config.max_position_embeddings,
                                  args.batch_size)
    else:
        tokenizer, loglik = base_lm_scorer(args.base_lm, args.batch_size)
    result = evaluate_mmlu(load_mmlu(data_path), tokenizer, loglik, cfg.evaluation.mmlu_shots)
    return write_metric(args.out, "mmlu", result["accuracy"], n=result["n"], **common,
                        details={"per_subject": result["per_subject"], "macro": result["macro"],
                                 "shots": cfg.evaluation.mmlu_shots, "data": str(data_path),
                                 "text_weight_hash": text_hash,
                                 "source": args.model or args.base_lm})


if __name__ == "__main__":
    main()
