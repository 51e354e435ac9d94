"""SAM (segment-anything ViT-B/L/H) behind volseg's model interface: the variants, their released
weights, the grey-EM input frame, and the prompt-learning parts (head prompt, prefix tokens, adapters)."""
