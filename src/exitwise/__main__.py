from .cli import main

if __name__ == "__main__":  # not when a spawned server process imports it (serve --processes)
    raise SystemExit(main())
