"""bitsmith.transforms"""
