"""Every training stage, declared once.

A declaration says what a stage is: its config section (a field of ``RunConfig``
with the same name), the directory it writes under the run, the SupportWorld set
it reads when the user gives no data, the model it starts from by default, the
module whose ``build(ctx)`` supplies its batches, loss and evaluation, and how the
summary prints its result. The pipeline, the CLI and the printed report read this
list; nothing else lists the stages. The harness (``chatforge.train.stage``) does
the rest for every stage.

This module imports no torch, so ``chatforge --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.paths import RunPaths

if TYPE_CHECKING:
    from chatforge.config import RunConfig

Metrics = dict[str, Any]


@dataclass(frozen=True)
class StageDecl:
    name: str  # config section, CLI name and manifest key
    describe: str  # one line: what the stage does
    build: str  # "module:function" taking a StageContext and returning StageParts (imported when run)
    subdir: str  # where it writes, under the run directory
    task: str  # what its model is: "lm" | "chat" | "generate" | "classify" | "tag"
    label: str  # its model in the list of outputs
    summary: Callable[[dict[str, Any]], str]  # the report line, from its eval.json
    parent: str | None = "pretrain"  # default init_from: a stage of the run; None = a fresh model
    supportworld: str | None = None  # SupportWorld set read when the section's *_data fields are empty
    files: tuple[tuple[str, str], ...] = ()  # (label, file name in the stage directory) listed as outputs
    command: str = "finetune"  # the CLI group that runs it alone: ``chatforge finetune NAME`` or ``align NAME``
    in_pipeline: bool = True  # whether ``chatforge pipeline run`` runs it (on-policy RL runs by its own command)


# --------------------------------------------------------------------------- report lines


def _f(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, int | float) else "n/a"


def _train_head(ev: dict[str, Any]) -> str:
    t = ev.get("train", {})
    return (f"{t.get('method', 'full')}, {t.get('trainable_params', 0):,} of {t.get('total_params', 0):,} params "
            f"trained, {_f(ev.get('wall_time_s'), '.0f')}s")


def _forgetting(m: Metrics) -> str:
    if "pretrain_val_ppl_before" not in m:
        return ""
    return (f"\n  forgetting: held-out pre-training perplexity {m['pretrain_val_ppl_before']:.2f} -> "
            f"{m['pretrain_val_ppl_after']:.2f} ({m['forgetting_ppl_change_pct']:+.1f}%)")


def _pretrain_summary(ev: dict[str, Any]) -> str:
    m, t = ev["metrics"], ev["train"]
    lines = [f"{t['steps']} steps, {t['tokens']:,} tokens, {t['tokens_per_s']:,.0f} tok/s "
             f"({t['dtype']} on {t['device']})",
             f"  held-out perplexity {m['val_ppl']:.2f} (loss {m['val_loss']:.3f}, {m['val_bpb']:.3f} bits/byte); "
             f"unigram baseline perplexity {m['unigram_ppl']:.2f}"]
    if "probe_repeat_ratio" in m:
        line = (f"  copy probe: nll {m['probe_first_nll']:.2f} on random tokens, {m['probe_repeat_nll']:.2f} on their "
                f"repeat (ratio {m['probe_repeat_ratio']:.2f}; well below 1 = the model copies from context)")
        if "probe_lookup_nll" in m:
            line += (f"; record lookup: nll {m['probe_lookup_nll']:.2f} on an order number in the record vs "
                     f"{m['probe_lookup_control_nll']:.2f} on one not in it, top-1 {100 * m['probe_lookup_top1']:.0f}%")
        lines.append(line)
    lines += [f"  sample: {s!r}" for s in ev.get("details", {}).get("samples", [])]
    return "\n".join(lines)


CHECK_LABELS = (("status", "status"), ("order number", "order_number"), ("name", "name"),
                ("intent handled", "intent"), ("no other customer's data", "no_leak"), ("turn ended", "ended"))


def _chat_summary(ev: dict[str, Any]) -> str:
    m = ev["metrics"]
    parts = [f"held-out assistant-token loss {_f(m.get('val_loss'))}"]
    if "test_bleu" in m:
        parts.append(f"BLEU {m['test_bleu']:.1f} chrF {m['test_chrf']:.1f} on {m['generated']} test prompts")
    if "test_status_correct" in m:
        parts.append(f"order status stated correctly in {100 * m['test_status_correct']:.0f}% "
                     f"of {m['status_checked']} answers")
    line = f"({_train_head(ev)}): " + ", ".join(parts)
    if "test_check_all" in m:
        shown = [(label, m.get(f"test_check_{key}")) for label, key in CHECK_LABELS]
        line += (f"\n  SupportWorld checks on {m['checked']} answers: "
                 + ", ".join(f"{label} {100 * v:.0f}%" for label, v in shown if isinstance(v, int | float))
                 + f"; all passed {100 * m['test_check_all']:.0f}%")
    if "bleu_signature" in ev.get("details", {}):
        line += f"\n  sacrebleu: {ev['details']['bleu_signature']}"
    return line + _forgetting(m)


def _checks_line(m: Metrics, d: dict[str, Any]) -> str:
    """The checks on held-out answers, each beside the parent's (SFT's) on the same prompts when known."""
    if "test_check_all" not in m:
        return ""
    before = d.get("parent_checks", {})

    def shown(key: str) -> str:
        was = before.get(f"test_check_{key}")
        return f"{100 * m[f'test_check_{key}']:.0f}%" + (f" (SFT {100 * was:.0f}%)" if was is not None else "")

    return (f"\n  SupportWorld checks on {m['checked']} answers: "
            + ", ".join(f"{label} {shown(key)}" for label, key in CHECK_LABELS if f"test_check_{key}" in m)
            + f"; all passed {shown('all')}")


def _versus_line(m: Metrics) -> str:
    """Length, KL and reward-model win rate of an aligned model against its parent (``align/compare.py``)."""
    if "test_answer_tokens" not in m:
        return ""
    parts = [f"answers {m['test_answer_tokens']:.0f} tokens"
             + (f" (SFT {m['test_parent_answer_tokens']:.0f})" if "test_parent_answer_tokens" in m else ""),
             f"KL from SFT {m['test_kl_from_parent']:.4f} per token"]
    if "test_rm_win_rate" in m:
        parts.append(f"reward-model win rate vs SFT {100 * m['test_rm_win_rate']:.0f}% of {m['test_rm_judged']}")
    return "\n  " + ", ".join(parts)


def _reward_summary(ev: dict[str, Any]) -> str:
    m, q = ev["metrics"], ev.get("details", {}).get("margin_quantiles", {})
    spread = ", ".join(f"{k} {v:+.2f}" for k, v in q.items())
    return (f"({_train_head(ev)}): held-out pairwise accuracy {100 * m['test_reward_accuracy']:.1f}% on "
            f"{m['test_pairs']} pairs (chance 50%); margin r(chosen) - r(rejected): mean {m['test_margin_mean']:+.2f}"
            + (f" ({spread})" if spread else "") + _forgetting(m))


def _dpo_summary(ev: dict[str, Any]) -> str:
    m, d = ev["metrics"], ev.get("details", {})
    line = (f"({_train_head(ev)}): {d.get('loss_type', 'sigmoid')} loss, beta {d.get('beta')}; held-out pairs: "
            f"reward accuracy {100 * m['test_reward_accuracy']:.0f}%, margin {m['test_reward_margin']:.2f} "
            f"(chosen {m['test_reward_chosen']:+.2f}, rejected {m['test_reward_rejected']:+.2f}) on "
            f"{m['test_pairs']} pairs")
    line += _checks_line(m, d) + _versus_line(m)
    return line + _forgetting(m)


def _grpo_summary(ev: dict[str, Any]) -> str:
    m, d = ev["metrics"], ev.get("details", {})
    line = f"({_train_head(ev)}): rewards {', '.join(d.get('rewards', []))}, groups of {d.get('group_size')}"
    if "train_reward_first" in m:
        line += f"; training reward {m['train_reward_first']:.3f} -> {m['train_reward_last']:.3f}"
    return line + _checks_line(m, d) + _versus_line(m) + _forgetting(m)


def _ppo_summary(ev: dict[str, Any]) -> str:
    m, d = ev["metrics"], ev.get("details", {})
    scored_by = ", ".join(([f"reward model {d['reward_model']}"] if d.get("reward_model") else [])
                          + list(d.get("rewards", [])))
    line = f"({_train_head(ev)}): scored by {scored_by}"
    if "train_score_first" in m:
        line += (f"; rollout score {m['train_score_first']:.3f} -> {m['train_score_last']:.3f}, KL to the start "
                 f"{m['train_kl_last']:.3f} per answer (coefficient {m['kl_coef_last']:.3g})")
    return line + _checks_line(m, d) + _versus_line(m) + _forgetting(m)


def _classify_summary(ev: dict[str, Any]) -> str:
    m = ev["metrics"]
    if "tfidf_logreg_accuracy" in m:
        classical = (f"TF-IDF + logistic regression {m['tfidf_logreg_accuracy']:.3f} "
                     f"(macro-F1 {m['tfidf_logreg_macro_f1']:.3f})")
    else:
        reason = ev.get("details", {}).get("tfidf_logreg", {}).get("reason", "not measured")
        classical = f"TF-IDF + logistic regression: {reason}"
    return (f"({_train_head(ev)}): test accuracy {m['test_accuracy']:.3f}, macro-F1 {m['test_macro_f1']:.3f} "
            f"(majority-class baseline {m['majority_baseline']:.3f}; {classical})" + _forgetting(m))


def _tag_summary(ev: dict[str, Any]) -> str:
    m = ev["metrics"]
    return (f"({_train_head(ev)}): test entity F1 {m['test_entity_f1']:.3f} (precision "
            f"{m['test_entity_precision']:.3f}, recall {m['test_entity_recall']:.3f}), token accuracy "
            f"{m['test_token_accuracy']:.3f}" + _forgetting(m))


# --------------------------------------------------------------------------- the stages, in order

TRAINING_STAGES: tuple[StageDecl, ...] = (
    StageDecl("pretrain", "pre-train the GPT on next-token prediction", "chatforge.train.pretrain:build",
              "pretrain", "lm", "pre-trained model", _pretrain_summary, parent=None),
    StageDecl("sft", "chat SFT on support conversations (assistant-only loss)", "chatforge.finetune.sft:build",
              "finetune/sft", "chat", "chat model (SFT)", _chat_summary, supportworld="conversations",
              files=(("SFT answers", "answers.jsonl"),)),
    StageDecl("sentiment", "sentiment classifier on reviews", "chatforge.finetune.classify:build",
              "finetune/sentiment", "classify", "sentiment model", _classify_summary, supportworld="reviews"),
    StageDecl("intent", "intent classifier on support conversations", "chatforge.finetune.classify:build",
              "finetune/intent", "classify", "intent model", _classify_summary, supportworld="intents"),
    StageDecl("moderation", "moderation classifier (safe or a policy category) on SupportWorld's safety examples",
              "chatforge.finetune.classify:build", "finetune/moderation", "classify", "moderation model",
              _classify_summary, supportworld="safety"),
    StageDecl("translate", "English -> Spanish translation (prompt -> completion)", "chatforge.finetune.sft:build",
              "finetune/translate", "generate", "translation model", _chat_summary, supportworld="translation"),
    StageDecl("tagging", "product-attribute tagger (BIO token classification)", "chatforge.finetune.tag:build",
              "finetune/tagging", "tag", "tagging model", _tag_summary, supportworld="tags"),
    StageDecl("reward", "reward model (Bradley-Terry on preference pairs), from the SFT model",
              "chatforge.align.reward:build", "align/reward", "reward", "reward model", _reward_summary, parent="sft",
              supportworld="preferences", command="align"),
    StageDecl("dpo", "DPO on preference pairs, from the SFT model (also the reference)", "chatforge.align.dpo:build",
              "align/dpo", "chat", "aligned model (DPO)", _dpo_summary, parent="sft", supportworld="preferences",
              files=(("DPO answers", "answers.jsonl"),), command="align"),
    StageDecl("ppo", "PPO: sampled answers scored by the reward model, a value head, GAE and a KL leash to the "
              "chat model", "chatforge.align.ppo:build", "align/ppo", "chat", "aligned model (PPO)", _ppo_summary,
              parent="sft", supportworld="conversations", files=(("PPO answers", "answers.jsonl"),), command="align",
              in_pipeline=False),
    StageDecl("grpo", "GRPO: sampled answers scored by reward functions (default: SupportWorld's checks)",
              "chatforge.align.grpo:build", "align/grpo", "chat", "aligned model (GRPO)", _grpo_summary, parent="sft",
              supportworld="conversations", files=(("GRPO answers", "answers.jsonl"),), command="align",
              in_pipeline=False),
)


def get_stage(name: str) -> StageDecl:
    for decl in TRAINING_STAGES:
        if decl.name == name:
            return decl
    raise ConfigError(f"unknown stage {name!r}; training stages: {', '.join(d.name for d in TRAINING_STAGES)}")


def finetune_stages() -> list[StageDecl]:
    """The stages ``chatforge finetune`` runs (they start from another model)."""
    return [d for d in TRAINING_STAGES if d.parent is not None and d.command == "finetune"]


def align_stages() -> list[StageDecl]:
    """The stages ``chatforge align`` runs (they start from the chat model)."""
    return [d for d in TRAINING_STAGES if d.command == "align"]


# --------------------------------------------------------------------------- parents and data


def parent_path(cfg: RunConfig, decl: StageDecl, init_from: str) -> Path | None:
    """The model directory ``init_from`` names, whether or not it exists yet (None: a fresh model)."""
    value = init_from or decl.parent
    if value is None:
        return None
    names = [d.name for d in TRAINING_STAGES]
    if value in names:
        return RunPaths(cfg.run_dir).stage(get_stage(value).subdir).model
    path = Path(value)
    if (path / "config.json").is_file():
        return path
    raise ConfigError(f"{decl.name}.init_from: {value!r} is neither a stage of this run ({', '.join(names)}) "
                      f"nor a model directory (one holding config.json)")


def resolve_parent(cfg: RunConfig, decl: StageDecl, init_from: str) -> Path | None:
    """Like ``parent_path``, with a clear error when the named stage has not produced its model yet."""
    path = parent_path(cfg, decl, init_from)
    if path is not None and not (path / "config.json").is_file():
        value = init_from or decl.parent
        command = "pretrain" if value == "pretrain" else f"{get_stage(value).command} {value}" \
            if value in [d.name for d in TRAINING_STAGES] else f"finetune {value}"
        raise ChatforgeError(f"{decl.name} starts from the {value} model, but {path} does not exist; run "
                             f"`chatforge {command}` (or the pipeline) first, or set {decl.name}.init_from")
    return path


def data_sources(cfg: RunConfig, decl: StageDecl) -> dict[str, str]:
    """train/val/test sources of a stage: the section's ``*_data``, else its SupportWorld set."""
    f = getattr(cfg, decl.name)
    if decl.supportworld is None:
        return {}
    default = RunPaths(cfg.run_dir).supportworld / decl.supportworld
    return {split: getattr(f, f"{split}_data") or str(default / f"{split}.jsonl") for split in ("train", "val", "test")}
