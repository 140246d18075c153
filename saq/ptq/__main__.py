from saq.cli.ptq import demo_or_main

if __name__ == "__main__":
    demo_or_main()
