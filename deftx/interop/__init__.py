"""Exchange with the ecosystem: composable-sft's SFT files, the Hugging Face Hub."""
