"""The mathematics the pieces share: Kronecker views and mode products (`kronecker`,
`layout`), eigenbases and their refresh (`eigenbasis`), whitening, the normal draws, IVON's
elementwise update and the scalar gates that keep gated buffers exact."""
