"""The maskvid command line: LightningCLI, data tools, strategy factory and launch scripts."""
