"""Fine-tuning on the pretraining stack: LoRA adapters (`starcoder.finetune.lora`)."""
