"""`python -m mars_dist ...` (also what `accelerate launch -m mars_dist ...` runs)."""

from mars_dist.cli import main

if __name__ == "__main__":
    main()
