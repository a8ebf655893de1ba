"""bitsmith.nn"""
