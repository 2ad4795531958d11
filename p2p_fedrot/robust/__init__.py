"""Byzantine robustness: attacks a dishonest peer can send, and robust rules that mix gauge-fixed LoRA factors."""
