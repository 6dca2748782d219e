"""`python -m convo`: the same as the `convo` command."""

from convo.cli import main

if __name__ == "__main__":
    main()
