"""`python -m fasttrain.evaluate` as a script, for `accelerate launch` in the tests."""
from fasttrain.entry import run_main
from fasttrain.evaluate import main

if __name__ == "__main__":   # the torch loader's workers start from a fork server, which imports this file
    run_main(main)
