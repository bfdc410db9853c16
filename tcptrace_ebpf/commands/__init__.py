"""What each CLI command does (cli.py is the click layer over these), and how
results are rendered for a terminal."""
