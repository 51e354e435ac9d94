"""The SAM-based methods: SAM tuning, prompt learning, All-in-SAM (weak labels → SAM masks) and DFG
(source-free box prompts)."""
