"""bitsmith.eval"""
