"""Names shared by the store, its CLI and the web app; no imports, so ``chatforge --help`` stays fast
(SQLAlchemy and Alembic load only when a feedback command runs)."""

ROLES = ("admin", "reviewer", "annotator")
DATASET_KINDS = ("prompts", "items")
ASSIGNMENT_KINDS = ("rate", "rank", "label")
RATING_ASPECTS = ("fluency", "coherence", "relevance", "appropriateness")
EXPORT_KINDS = ("preferences", "sft", "labels", "ratings")  # training data for the chat model (the default)
MODERATION_KIND = "moderation"  # reviewed safety flags, as the moderation classifier's {"text", "label"} data
ALL_EXPORT_KINDS = (*EXPORT_KINDS, MODERATION_KIND)
