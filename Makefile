.PHONY: mini

# Train the bundled mmguard-mini from scratch (see docs/model-card-mmguard-mini.md).
mini:
	scripts/make_mini.sh $(DATASETS) $(WORK)
