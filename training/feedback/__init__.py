"""The learning loop's data side: the feedback store (SQLAlchemy), its stream consumer, stats and export."""
