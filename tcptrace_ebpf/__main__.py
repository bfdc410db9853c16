from .cli import main

# Guarded: multiprocessing children (spawn) import the main module again.
if __name__ == "__main__":
    main()
