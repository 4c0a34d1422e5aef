"""The moderation classifier: a classification-stage model whose labels are ``safe`` and policy categories.

It is trained like any classifier (``chatforge finetune moderation``, on SupportWorld's
``safety/`` examples or the user's own ``{"text", "label"}`` data, e.g. reviewers'
decisions exported from the review queue). Here it is loaded once and asked, per text,
for the categories whose probability exceeds the policy's threshold. Labels that are not
categories of the policy in use are ignored (a model trained with more categories still
works with a smaller policy), and the policy's categories the model never saw are left to
the rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chatforge.safety.moderation import SAFE, Finding
from chatforge.safety.policy import Policy


class ModerationClassifier:
    """A loaded moderation model: ``probs(texts)`` and policy ``findings`` for texts."""

    def __init__(self, model: Any, tok: Any, labels: list[str], device: torch.device | str = "cpu",
                 max_len: int = 256, source: str = ""):
        if SAFE not in labels:
            raise ValueError(f"{source or 'moderation model'}: its labels {labels} have no {SAFE!r}; a moderation "
                             f"classifier is trained on 'safe' and category labels")
        self.model, self.tok, self.labels = model, tok, labels
        self.device = torch.device(device)
        self.max_len = min(max_len, model.backbone.config.block_size)
        self.source = source

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> ModerationClassifier:
        from chatforge.finetune.classify import load_classifier

        model, tok, labels = load_classifier(Path(directory), device)
        return cls(model, tok, labels, device, source=str(directory))

    @torch.no_grad()
    def probs(self, texts: list[str], batch_size: int = 64) -> list[dict[str, float]]:
        """Per text, the probability of each label."""
        out: list[dict[str, float]] = []
        for i in range(0, len(texts), batch_size):
            rows = [[self.tok.bos_id, *self.tok.encode(t)][: self.max_len] for t in texts[i:i + batch_size]]
            T = max(len(r) for r in rows)
            idx = torch.full((len(rows), T), self.tok.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.bool)
            for k, r in enumerate(rows):
                idx[k, :len(r)] = torch.tensor(r)
                mask[k, :len(r)] = True
            p = torch.softmax(self.model(idx.to(self.device), mask.to(self.device)).float(), -1).cpu()
            out.extend({lab: float(p[k, j]) for j, lab in enumerate(self.labels)} for k in range(len(rows)))
        return out

    def _findings(self, probs: dict[str, float], policy: Policy) -> list[Finding]:
        names = set(policy.names)
        hits = sorted(((p, lab) for lab, p in probs.items() if lab != SAFE and lab in names and p > policy.threshold),
                      reverse=True)
        return [Finding(lab, "classifier", "classifier", score=p) for p, lab in hits]

    def findings(self, text: str, policy: Policy) -> list[Finding]:
        return self._findings(self.probs([text])[0], policy)

    def findings_many(self, texts: list[str], policy: Policy) -> list[list[Finding]]:
        return [self._findings(p, policy) for p in self.probs(texts)] if texts else []
