"""Fine-tuning on the pretraining stack: LoRA adapters (`starcoder.finetune.lora`) and DPO on
preference pairs (`starcoder.finetune.dpo`)."""
