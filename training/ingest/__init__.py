"""Chat export parsers (Telegram, WhatsApp, Discord, JSONL) and the `convo ingest` pipeline."""
