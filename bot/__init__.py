"""Platform adapters and the platform-free bot core. Never imports torch, transformers, peft or trl."""
