.PHONY: mini mini-v1

# Build mmguard-mini v2, the bundled default (src/mmguard/assets/mmguard-mini): LoRA on SmolLM2-135M-Instruct
# (see docs/model-card-mmguard-mini.md).
mini:
	scripts/make_mini.sh $(DATASETS) $(WORK)

# The v1 recipe: an Mllama trained from scratch (no pretrained weights; a toy), into build/mini-v1/model.
mini-v1:
	scripts/make_mini_v1.sh $(DATASETS) $(WORK)
