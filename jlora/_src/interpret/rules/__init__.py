"""The interpreter's rules, one concept a module, composed into one table by `jlora._src.interpret.table`.

`branch` holds the pieces of a LoRA branch the product rules share; `products`,
`dora`, `moe` and `routing` use a kernel; `views` follow it; `parallel` and
`control` evaluate bodies with it.
"""
