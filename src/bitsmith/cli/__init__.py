"""bitsmith.cli"""
