.PHONY: mini mini-v1

# Build mmguard-mini v2 (src/mmguard/assets/mmguard-mini-v2): LoRA on SmolLM2-135M-Instruct (see docs/model-card-mmguard-mini-v2.md).
mini:
	scripts/make_mini.sh $(DATASETS) $(WORK)

# The v1 recipe: the same architecture family trained from scratch (no pretrained weights; a toy).
mini-v1:
	scripts/make_mini_v1.sh $(DATASETS) $(WORK)
