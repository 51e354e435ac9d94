"""Prompt-DAS training: source, oracle, UDA and WDA (mean teacher, pseudo-labels, PCL, prompts)."""
