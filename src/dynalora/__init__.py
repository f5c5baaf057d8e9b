"""dynalora: dynamic low-rank module allocation (DynaLoRA) over PEFT adapters."""
