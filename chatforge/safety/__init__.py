"""Safety: a policy of hazard categories, rules + a moderation classifier, guarded serving, bias probes.

``policy`` reads the TOML policy (``default_policy.toml`` ships); ``moderation`` checks a
text against it (rules, then the classifier) and says what to do in each place.
"""

from chatforge.safety.moderation import Finding, Moderator, Verdict, redact
from chatforge.safety.policy import Category, Policy, load_policy

__all__ = ["Category", "Finding", "Moderator", "Policy", "Verdict", "load_policy", "redact"]
