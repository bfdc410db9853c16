from .cli import main

# Guarded: importing the module runs nothing.
if __name__ == "__main__":
    main()
